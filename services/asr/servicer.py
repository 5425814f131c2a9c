"""AsrService.StreamingRecognize: the protocol state machine in front of an `AsrBackend`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, common_pb2
from services.asr.backend import (
    AsrBackend,
    FinalizeEvent,
    FinalizeKind,
    Hypothesis,
    RecognizedWord,
    RecognizerEvent,
    StreamOptions,
)
from services.asr.feed import UtteranceFeed
from services.asr.riva import RivaAsrServicer
from services.asr.settings import AsrSettings
from services.runtime import trace_types as names
from services.runtime.errors import InvalidArgument, rpc_errors
from services.runtime.ids import check_client_id, new_id
from services.runtime.languages import resolve_language
from services.runtime.protocol import (
    first_request_required,
    opening_request_repeated,
    unknown_request,
)
from services.runtime.service import MeshService
from services.runtime.streams import Duplex, StreamQueue
from services.runtime.telemetry import Telemetry, context_from

log = logging.getLogger(__name__)

SUPPORTED_SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
_ACCEPTED_ENCODINGS = (
    common_pb2.AUDIO_ENCODING_UNSPECIFIED,
    common_pb2.AUDIO_ENCODING_LINEAR16,
)
_FINAL_REASONS = {
    FinalizeKind.FINALIZE: asr_pb2.FINAL_REASON_FINALIZE,
    FinalizeKind.MAX_DURATION: asr_pb2.FINAL_REASON_MAX_DURATION,
    FinalizeKind.END_OF_STREAM: asr_pb2.FINAL_REASON_END_OF_STREAM,
}
# Events between the request reader and the recognizer: ~1.3 s of 20 ms frames. When the model
# falls further behind, the reader waits, and gRPC flow control slows the client down.
_EVENT_QUEUE_SIZE = 64
_RESPONSE_QUEUE_SIZE = 32

Request = asr_pb2.StreamingRecognizeRequest
Response = asr_pb2.StreamingRecognizeResponse


class AsrService(MeshService[AsrSettings, AsrBackend], asr_pb2_grpc.AsrServiceServicer):
    """Serves StreamingRecognize with one backend shared by all streams."""

    service_name = asr_pb2.DESCRIPTOR.services_by_name["AsrService"].full_name
    telemetry_name = "nemotron-asr"
    add_to_server = staticmethod(asr_pb2_grpc.add_AsrServiceServicer_to_server)

    #: Riva's speech recognition API, on the same port.
    companions = (RivaAsrServicer,)

    @rpc_errors
    async def StreamingRecognize(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        """Config, then audio and finalize requests -> ready, then transcripts."""
        async with self.admit(), Duplex[Response](_RESPONSE_QUEUE_SIZE) as duplex:
            requests = aiter(request_iterator)
            first = await anext(requests, None)
            if first is None:
                return
            options, input_rate = self._configure(first)
            log.info(
                "stream %s opened: %d Hz, language %s, interim %s",
                options.session_id,
                input_rate,
                options.language,
                options.interim_results,
            )
            yield Response(
                ready=asr_pb2.RecognizerReady(
                    session_id=options.session_id,
                    model=self.backend.model_name,
                    backend=self.backend.name,
                    language=options.language,
                )
            )
            relay = _TranscriptRelay(
                options,
                self.settings.log_content,
                self.telemetry,
                self.backend.name,
                self.backend.model_name,
            )
            events: StreamQueue[RecognizerEvent] = StreamQueue(_EVENT_QUEUE_SIZE)
            feed = UtteranceFeed(self.settings, self.backend.sample_rate_hz, input_rate, events)
            reader = _RequestReader(feed)
            duplex.spawn(reader.run(requests), name=f"{options.session_id}-reader")
            duplex.spawn(
                self._relay(options, relay, events, duplex),
                name=f"{options.session_id}-recognizer",
            )
            stream_span = (
                self.telemetry.tracer.start_span(
                    names.SPAN_ASR_STREAM,
                    attributes={
                        names.ATTR_SESSION_ID: options.session_id,
                        names.ATTR_BACKEND: self.backend.name,
                        names.ATTR_MODEL: self.backend.model_name,
                    },
                )
                if self.telemetry.enabled
                else None
            )
            try:
                async for response in duplex.responses():
                    yield response
            finally:
                if stream_span is not None:
                    stream_span.end()
                log.info("stream %s closed", options.session_id)

    def _configure(self, first: Request) -> tuple[StreamOptions, int]:
        kind = first.WhichOneof("request")
        if kind != "config":
            raise first_request_required("config", kind, "audio or finalize")
        config = first.config
        if config.sample_rate_hz not in SUPPORTED_SAMPLE_RATES:
            raise InvalidArgument(
                f"sample_rate_hz {config.sample_rate_hz} is not supported; use one of "
                f"{', '.join(map(str, SUPPORTED_SAMPLE_RATES))}",
                field="config.sample_rate_hz",
            )
        if config.encoding not in _ACCEPTED_ENCODINGS:
            raise InvalidArgument("only LINEAR16 audio is accepted", field="config.encoding")
        language = resolve_language(
            config.language,
            self.backend.languages,
            self.backend.languages[0],
            field="config.language",
        )
        if config.word_timestamps and not self.backend.word_timestamps:
            raise InvalidArgument(
                f"word_timestamps is not offered by the {self.backend.name} backend; "
                "leave it false",
                field="config.word_timestamps",
            )
        options = StreamOptions(
            session_id=new_id("asr"),
            language=language,
            interim_results=config.interim_results,
            word_timestamps=config.word_timestamps,
        )
        return options, config.sample_rate_hz

    async def _relay(
        self,
        options: StreamOptions,
        relay: _TranscriptRelay,
        events: StreamQueue[RecognizerEvent],
        duplex: Duplex[Response],
    ) -> None:
        """Run the backend's recognizer and turn its hypotheses into protocol responses."""
        recognizer = self.backend.recognize(options, events)
        try:
            async for hypothesis in recognizer:
                response = relay.to_response(hypothesis)
                if response is not None:
                    await duplex.send(response)
        finally:
            await recognizer.aclose()
        duplex.finish()


@dataclass
class _TranscriptRelay:
    """Protocol rules on the way out: offsets, de-duplication, soft is never final.

    The stability of a non-final result is measured: the share of its words that the previous
    result of the utterance (interim or soft) had in the same places; 0 for the first one.
    """

    options: StreamOptions
    log_content: bool
    telemetry: Telemetry
    backend_name: str
    model_name: str
    utterance_start_ms: float = 0.0
    last_text: str | None = None

    def to_response(self, hypothesis: Hypothesis) -> Response | None:
        """The response for `hypothesis`, or None when nothing is to be sent."""
        finalize = hypothesis.answers
        if finalize is None:
            if not self.options.interim_results or hypothesis.text == self.last_text:
                return None
            stability = measured_stability(self.last_text, hypothesis.text)
            self.last_text = hypothesis.text
            start_ms = round(self.utterance_start_ms)
            end_ms = round(self.utterance_start_ms + hypothesis.audio_ms)
            return Response(
                transcript=asr_pb2.Transcript(
                    text=hypothesis.text,
                    is_final=False,
                    audio_start_ms=start_ms,
                    audio_end_ms=end_ms,
                    stability=stability,
                    words=self._words(hypothesis, start_ms, end_ms),
                )
            )
        elapsed_ms = 1000.0 * (time.perf_counter() - finalize.received_at)
        start_ms, end_ms = round(finalize.start_ms), round(finalize.end_ms)
        transcript = asr_pb2.Transcript(
            text=hypothesis.text,
            is_final=not finalize.soft,
            soft=finalize.soft,
            utterance_id=finalize.utterance_id,
            audio_start_ms=start_ms,
            audio_end_ms=end_ms,
            stability=measured_stability(self.last_text, hypothesis.text) if finalize.soft else 1.0,
            final_reason=_FINAL_REASONS.get(finalize.kind, asr_pb2.FINAL_REASON_UNSPECIFIED),
            timing=common_pb2.Timing(ttfb_ms=elapsed_ms, total_ms=elapsed_ms),
            words=self._words(hypothesis, start_ms, end_ms),
        )
        if finalize.soft:
            self.last_text = hypothesis.text
        else:
            self.utterance_start_ms = finalize.end_ms
            self.last_text = None
        if self.telemetry.enabled:
            self._trace(finalize, hypothesis, elapsed_ms)
        log.info(
            "stream %s: %s transcript for %r, %d chars%s, %.0f ms after finalize",
            self.options.session_id,
            "soft" if finalize.soft else "final",
            finalize.utterance_id,
            len(hypothesis.text),
            f" {hypothesis.text!r}" if self.log_content else "",
            elapsed_ms,
        )
        return Response(transcript=transcript)

    def _words(self, hypothesis: Hypothesis, start_ms: int, end_ms: int) -> list[asr_pb2.Word]:
        """The hypothesis' words in ms since the stream began, kept inside the result's audio."""
        if not self.options.word_timestamps:
            return []
        return stream_words(hypothesis.words, start_ms, end_ms)

    def _trace(self, finalize: FinalizeEvent, hypothesis: Hypothesis, elapsed_ms: float) -> None:
        attributes = {
            names.ATTR_TTFB_MS: elapsed_ms,
            names.ATTR_BACKEND: self.backend_name,
            names.ATTR_MODEL: self.model_name,
            names.ATTR_SESSION_ID: self.options.session_id,
            names.ATTR_UTTERANCE_ID: finalize.utterance_id,
            names.ATTR_AUDIO_MS: finalize.end_ms - finalize.start_ms,
            names.ATTR_FINAL_REASON: finalize.kind.value,
        }
        if self.telemetry.record_content:
            attributes[names.ATTR_TRANSCRIPT] = hypothesis.text
        parent = context_from(finalize.trace_context)
        now = time.perf_counter()
        self.telemetry.span_between(
            names.SPAN_ASR_FINALIZE, finalize.received_at, now, attributes, parent=parent
        )
        if not finalize.soft and finalize.audio_started_at is not None:
            utterance = {k: v for k, v in attributes.items() if k != names.ATTR_TTFB_MS}
            self.telemetry.span_between(
                names.SPAN_ASR_UTTERANCE, finalize.audio_started_at, now, utterance, parent=parent
            )
        if not finalize.soft:
            self.telemetry.record_ttfb(
                names.METRIC_ASR_TTFB, elapsed_ms, {names.ATTR_BACKEND: self.backend_name}
            )


def measured_stability(previous: str | None, text: str) -> float:
    """The share of `text`'s words that `previous` had in the same places (0 without either)."""
    words = text.split()
    if previous is None or not words:
        return 0.0
    same = sum(1 for old, new in zip(previous.split(), words, strict=False) if old == new)
    return same / len(words)


def stream_words(words: Sequence[RecognizedWord], start_ms: int, end_ms: int) -> list[asr_pb2.Word]:
    """Utterance-relative words as `Word`s in stream time, in order and inside [start, end].

    A model's word times may run a little past the audio (alignment frames, padding the decode
    heard); they are clamped, and a start never precedes the previous word's start.
    """
    result: list[asr_pb2.Word] = []
    floor = start_ms
    for word in words:
        start = min(max(round(start_ms + word.start_ms), floor), end_ms)
        end = min(max(round(start_ms + word.end_ms), start), end_ms)
        result.append(
            asr_pb2.Word(
                text=word.text,
                start_ms=start,
                end_ms=end,
                confidence=min(max(word.confidence, 0.0), 1.0),
            )
        )
        floor = start
    return result


class _RequestReader:
    """Validates requests after the config and hands audio and finalizes to the feed."""

    def __init__(self, feed: UtteranceFeed) -> None:
        self.feed = feed

    async def run(self, requests: AsyncIterator[Request]) -> None:
        """Read until the client half-closes; then finalize pending audio and end the events."""
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "audio":
                await self.feed.audio(request.audio)
            elif kind == "finalize":
                utterance_id = check_client_id(
                    request.finalize.utterance_id, "finalize.utterance_id"
                )
                soft = FinalizeKind.SOFT if request.finalize.soft else FinalizeKind.FINALIZE
                await self.feed.finalize(
                    utterance_id, soft, trace_context=dict(request.finalize.trace_context)
                )
            elif kind == "config":
                raise opening_request_repeated("config")
            else:
                raise unknown_request("config, audio or finalize")
        await self.feed.end()

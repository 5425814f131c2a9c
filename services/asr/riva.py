"""nvidia.riva.asr.RivaSpeechRecognition on the ASR server, over the same backend and limits.

Stock Riva clients (`riva.client.ASRService`, Pipecat's and LiveKit's NVIDIA STT) stream audio and
never say where an utterance ends: the server decides, with Riva's endpointing settings applied
to our energy VAD (`services.asr.endpointing`). Audio goes through the same `UtteranceFeed` as on
the v1 API, to the same recognizers; each stream holds one slot of the server's stream limit.

What Riva offers and this server does not: one alternative per result (max_alternatives above 1
still gets one), LINEAR_PCM audio only, mono only, no diarization, word boosting or profanity
filter (ignored). Word time offsets are estimated: the words of a result are spread over the
speech the VAD heard in it, in proportion to their length; Whisper's own alignment is not used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar

import grpc
from riva.proto import riva_asr_pb2, riva_asr_pb2_grpc

from services.asr.backend import AsrBackend, FinalizeKind, Hypothesis, StreamOptions
from services.asr.endpointing import Endpointer, VoiceTimeline
from services.asr.feed import UtteranceFeed
from services.asr.riva_config import RivaOptions, check_config, offline_audio
from services.asr.settings import AsrSettings
from services.runtime.errors import InvalidArgument, rpc_errors, unary_rpc_errors
from services.runtime.ids import new_id
from services.runtime.service import MeshService
from services.runtime.streams import Duplex, StreamQueue

log = logging.getLogger(__name__)

SERVICE_NAME = riva_asr_pb2.DESCRIPTOR.services_by_name["RivaSpeechRecognition"].full_name
_EVENT_QUEUE_SIZE = 64
_RESULT_QUEUE_SIZE = 32
#: An offline request's audio goes to the recognizer in pieces of this many ms, as if streamed.
_OFFLINE_PIECE_MS = 100
#: Quiet audio between utterances is dropped in pieces of this length (see `_read`).
_IDLE_CUT_MS = 1000
_PUNCTUATION = re.compile(r"[^\w\s'-]+")
_SPACES = re.compile(r"\s+")

Result = riva_asr_pb2.StreamingRecognitionResult


class RivaAsrServicer(riva_asr_pb2_grpc.RivaSpeechRecognitionServicer):
    """Riva's speech recognition API in front of an ASR `MeshService`'s backend."""

    service_name: ClassVar[str] = SERVICE_NAME

    def __init__(self, service: MeshService[AsrSettings, AsrBackend]) -> None:
        self.service = service

    def register(self, server: grpc.aio.Server) -> None:
        """Add this servicer to `server`."""
        riva_asr_pb2_grpc.add_RivaSpeechRecognitionServicer_to_server(self, server)

    @rpc_errors
    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[riva_asr_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[riva_asr_pb2.StreamingRecognizeResponse]:
        """streaming_config, then audio_content -> interim and final results."""
        async with self.service.admit():
            requests = aiter(request_iterator)
            first = await anext(requests, None)
            if first is None:
                return
            if first.WhichOneof("streaming_request") != "streaming_config":
                raise InvalidArgument(
                    "the first request must carry streaming_config; send audio_content after it",
                    field="streaming_config",
                )
            streaming = first.streaming_config
            options = self._check(streaming.config, "streaming_config.config")
            interim = streaming.interim_results
            async with aclosing(self._recognize(options, interim, _audio_of(requests))) as results:
                async for result in results:
                    yield riva_asr_pb2.StreamingRecognizeResponse(results=[result], id=first.id)

    @unary_rpc_errors
    async def Recognize(
        self, request: riva_asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> riva_asr_pb2.RecognizeResponse:
        """The whole audio at once -> one result per utterance."""
        async with self.service.admit():
            pcm, header_rate = offline_audio(request.audio, "audio")
            options = self._check(request.config, "config", header_rate)
            piece = 2 * options.sample_rate_hz * _OFFLINE_PIECE_MS // 1000
            pieces = _aiter([pcm[i : i + piece] for i in range(0, len(pcm), piece)])
            async with aclosing(self._recognize(options, False, pieces)) as streamed:
                results = [
                    riva_asr_pb2.SpeechRecognitionResult(
                        alternatives=result.alternatives,
                        channel_tag=result.channel_tag,
                        audio_processed=result.audio_processed,
                    )
                    async for result in streamed
                ]
            return riva_asr_pb2.RecognizeResponse(results=results, id=request.id)

    @unary_rpc_errors
    async def GetRivaSpeechRecognitionConfig(
        self,
        request: riva_asr_pb2.RivaSpeechRecognitionConfigRequest,
        context: grpc.aio.ServicerContext,
    ) -> riva_asr_pb2.RivaSpeechRecognitionConfigResponse:
        """The one model served, described with the parameters Riva clients look for."""
        backend = self.service.backend
        configs = [
            riva_asr_pb2.RivaSpeechRecognitionConfigResponse.Config(
                model_name=backend.model_name,
                parameters={
                    "language_code": language,
                    "type": "online",
                    "streaming": "true",
                    "offline": "true",
                    "sample_rate": str(backend.sample_rate_hz),
                    "backend": backend.name,
                },
            )
            for language in backend.languages
        ]
        if request.model_name:
            configs = [c for c in configs if c.model_name == request.model_name]
        return riva_asr_pb2.RivaSpeechRecognitionConfigResponse(model_config=configs)

    def _check(
        self, config: riva_asr_pb2.RecognitionConfig, prefix: str, header_rate: int | None = None
    ) -> RivaOptions:
        backend = self.service.backend
        return check_config(
            config, tuple(backend.languages), backend.model_name, prefix, header_rate
        )

    async def _recognize(
        self, options: RivaOptions, interim: bool, audio: AsyncIterator[bytes]
    ) -> AsyncGenerator[Result, None]:
        """Run one stream's audio through feed, endpointer and recognizer; yield its results."""
        backend = self.service.backend
        stream = StreamOptions(
            new_id("riva"),
            options.language,
            interim_results=interim,
            word_timestamps=options.word_offsets and backend.word_timestamps,
        )
        events: StreamQueue[Any] = StreamQueue(_EVENT_QUEUE_SIZE)
        feed = UtteranceFeed(
            self.service.settings, backend.sample_rate_hz, options.sample_rate_hz, events
        )
        endpointer = Endpointer(options.endpointing, backend.sample_rate_hz)
        results = _ResultMaker(options, interim, endpointer.timeline)
        log.info(
            "riva stream %s opened: %d Hz, language %s, interim %s",
            stream.session_id,
            options.sample_rate_hz,
            options.language,
            interim,
        )
        async with Duplex[Result](_RESULT_QUEUE_SIZE) as duplex:
            duplex.spawn(_read(audio, feed, endpointer), name=f"{stream.session_id}-reader")
            duplex.spawn(
                _relay(backend, stream, events, results, duplex),
                name=f"{stream.session_id}-recognizer",
            )
            try:
                async for result in duplex.responses():
                    yield result
            finally:
                log.info("riva stream %s closed", stream.session_id)


async def _audio_of(
    requests: AsyncIterator[riva_asr_pb2.StreamingRecognizeRequest],
) -> AsyncIterator[bytes]:
    async for request in requests:
        kind = request.WhichOneof("streaming_request")
        if kind == "audio_content":
            yield request.audio_content
        elif kind == "streaming_config":
            raise InvalidArgument(
                "streaming_config was already sent; send it once, in the first request",
                field="streaming_config",
            )
        else:
            raise InvalidArgument(
                "a StreamingRecognizeRequest carries neither audio_content nor "
                "streaming_config; after the config, send audio_content",
                field="streaming_request",
            )


async def _aiter(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def _read(audio: AsyncIterator[bytes], feed: UtteranceFeed, endpointer: Endpointer) -> None:
    """Feed the audio; finalize wherever the endpointer hears an utterance end.

    Between utterances, a quiet stretch is finalized too (answered with empty text, without a
    decode, and not sent): otherwise minutes of silence, or a Riva client's keepalive audio,
    would become the head of the next utterance, which the recognizer would then decode whole.
    """
    async for data in audio:
        samples = await feed.audio(data)
        for _ in range(endpointer.push(samples)):
            if feed.pending:
                await feed.finalize("", FinalizeKind.FINALIZE)
        quiet = not endpointer.in_speech and endpointer.quiet_ms >= _IDLE_CUT_MS
        if quiet and feed.pending_ms >= _IDLE_CUT_MS:
            await feed.finalize("", FinalizeKind.FINALIZE)
    await feed.end()


async def _relay(
    backend: AsrBackend,
    stream: StreamOptions,
    events: StreamQueue[Any],
    results: _ResultMaker,
    duplex: Duplex[Result],
) -> None:
    recognizer = backend.recognize(stream, events)
    try:
        async for hypothesis in recognizer:
            result = results.make(hypothesis)
            if result is not None:
                await duplex.send(result)
    finally:
        await recognizer.aclose()
    duplex.finish()


class _ResultMaker:
    """Riva results from hypotheses: punctuation, words, de-duplicated interims, offsets."""

    def __init__(self, options: RivaOptions, interim: bool, timeline: VoiceTimeline) -> None:
        self.options = options
        self.interim = interim
        self.timeline = timeline
        self.utterance_start_ms = 0.0
        self.last_text: str | None = None

    def make(self, hypothesis: Hypothesis) -> Result | None:
        """The result for `hypothesis`, or None when there is nothing to send."""
        text = self._styled(hypothesis.text)
        finalize = hypothesis.answers
        if finalize is None:
            if not self.interim or not text or text == self.last_text:
                return None
            self.last_text = text
            end_ms = self.utterance_start_ms + hypothesis.audio_ms
            alternative = riva_asr_pb2.SpeechRecognitionAlternative(
                transcript=text, language_code=[self.options.language_code]
            )
            return Result(
                alternatives=[alternative],
                is_final=False,
                stability=hypothesis.stability,
                audio_processed=end_ms / 1000.0,
            )
        self.utterance_start_ms = finalize.end_ms
        self.last_text = None
        speech = self.timeline.speech_within(finalize.start_ms, finalize.end_ms)
        if not text:
            return None  # an utterance of silence or noise: Riva sends nothing for it
        alternative = riva_asr_pb2.SpeechRecognitionAlternative(
            transcript=text, confidence=1.0, language_code=[self.options.language_code]
        )
        if self.options.word_offsets:
            timed = self._timed_words(hypothesis, finalize.start_ms, finalize.end_ms)
            if timed is None:  # a backend without word times: estimate them
                span = speech or (finalize.start_ms, finalize.end_ms)
                timed = _words(text, span, self.options.language_code)
            alternative.words.extend(timed)
        return Result(
            alternatives=[alternative],
            is_final=True,
            stability=1.0,
            audio_processed=finalize.end_ms / 1000.0,
        )

    def _timed_words(
        self, hypothesis: Hypothesis, start_ms: float, end_ms: float
    ) -> list[riva_asr_pb2.WordInfo] | None:
        """The backend's own word times as Riva's, styled as the transcript is (None: none)."""
        styled = [(self._styled(w.text), w) for w in hypothesis.words]
        words = [(text, word) for text, word in styled if text]
        if not words or [text for text, _ in words] != self._styled(hypothesis.text).split():
            return None
        infos = []
        floor = start_ms  # starts never go back
        for text, word in words:
            begin = min(max(start_ms + word.start_ms, floor), end_ms)
            floor = begin
            infos.append(
                riva_asr_pb2.WordInfo(
                    word=text,
                    start_time=round(begin),
                    end_time=round(min(max(start_ms + word.end_ms, begin), end_ms)),
                    confidence=min(max(word.confidence, 0.0), 1.0),
                    language_code=self.options.language_code,
                )
            )
        return infos

    def _styled(self, text: str) -> str:
        text = text.strip()
        if self.options.punctuation:
            return text
        # Riva without punctuation: lower case, no punctuation marks (apostrophes stay).
        return _SPACES.sub(" ", _PUNCTUATION.sub("", text)).strip().lower()


def _words(text: str, span: tuple[float, float], language_code: str) -> list[riva_asr_pb2.WordInfo]:
    """Words of `text` spread over `span` (ms) in proportion to their length (an estimate)."""
    words = text.split()
    start_ms, end_ms = span
    weights = [len(word) + 1 for word in words]
    scale = (end_ms - start_ms) / max(sum(weights), 1)
    infos = []
    position = start_ms
    for word, weight in zip(words, weights, strict=True):
        begin, position = position, position + weight * scale
        infos.append(
            riva_asr_pb2.WordInfo(
                word=word,
                start_time=round(begin),
                end_time=round(position - scale),  # the share of the gap after the word
                confidence=1.0,
                language_code=language_code,
            )
        )
    return infos

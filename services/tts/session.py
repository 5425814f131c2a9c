"""One Synthesize call: its streams, segment queue, cancel and close semantics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace

from nemotron.speech.v1 import common_pb2, tts_pb2
from services.runtime import trace_types as names
from services.runtime.audio import StreamResampler, duration_ms, float_to_pcm16
from services.runtime.errors import InvalidArgument, ResourceExhausted
from services.runtime.ids import check_client_id, new_id
from services.runtime.protocol import opening_request_repeated, unknown_request
from services.runtime.streams import Duplex, cancel_and_wait
from services.runtime.telemetry import Telemetry, context_from
from services.tts.backend import SynthesisJob, SynthesisMode, TimedAudio, TtsBackend, Voice
from services.tts.settings import TtsSettings
from services.tts.speakable import normalize
from services.tts.splitting import split_for_synthesis
from services.tts.words import PlacedWord, SegmentWords, TimingSource

log = logging.getLogger(__name__)

Request = tts_pb2.SynthesizeRequest
Response = tts_pb2.SynthesizeResponse

# Audio messages carry at most this much audio, so a long BATCH segment is still sent in
# bounded messages and a cancel can drop what has not gone out yet.
_MAX_CHUNK_MS = 500
_SOURCES = {
    TimingSource.MODEL: tts_pb2.WORD_TIMING_SOURCE_MODEL,
    TimingSource.ESTIMATED: tts_pb2.WORD_TIMING_SOURCE_ESTIMATED,
}
_MODES = {
    tts_pb2.SYNTHESIS_MODE_UNSPECIFIED: SynthesisMode.STREAM,
    tts_pb2.SYNTHESIS_MODE_STREAM: SynthesisMode.STREAM,
    tts_pb2.SYNTHESIS_MODE_BATCH: SynthesisMode.BATCH,
}


@dataclass(frozen=True)
class CallConfig:
    """The validated config of one call."""

    voice: Voice
    language: str
    sample_rate_hz: int


@dataclass
class _Segment:
    stream_id: str
    segment_id: str
    pieces: list[str]
    mode: SynthesisMode
    text: str  # as sent, for its words
    spoken: str  # as normalised, which `pieces` split
    text_chars: int = 0
    trace_context: dict[str, str] = field(default_factory=dict)
    received_at: float = field(default_factory=time.perf_counter)


class SynthesisSession:
    """The reader and the speaking worker of one call, sharing its state on the event loop."""

    def __init__(
        self,
        backend: TtsBackend,
        settings: TtsSettings,
        config: CallConfig,
        duplex: Duplex[Response],
        telemetry: Telemetry | None = None,
    ) -> None:
        self.backend = backend
        self.telemetry = telemetry or Telemetry()
        self.settings = settings
        self.config = config
        self.duplex = duplex
        self.stream_id: str | None = None
        self.stream_audio_ms = 0.0
        self.queue: deque[_Segment] = deque()
        self.wake = asyncio.Event()
        self.closing = False
        self.speaking: asyncio.Task[None] | None = None
        self.stream_span: trace.Span | None = None

    # ---- reader -------------------------------------------------------------------------------

    async def read(self, requests: AsyncIterator[Request]) -> None:
        """Apply requests in order; `close` or the client's half-close ends the reading."""
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "text":
                await self._enqueue(request.text)
            elif kind == "cancel":
                await self._cancel()
            elif kind == "close":
                break
            elif kind == "config":
                raise opening_request_repeated("config")
            else:
                raise unknown_request("config, text, close or cancel")
        self.closing = True
        self.wake.set()

    async def _enqueue(self, segment: tts_pb2.TextSegment) -> None:
        segment_id = check_client_id(segment.segment_id, "text.segment_id")
        if len(segment.text) > self.settings.max_text_chars:
            raise InvalidArgument(
                f"text is {len(segment.text)} characters; at most "
                f"{self.settings.max_text_chars} per segment (split it, or raise "
                "--max-text-chars)",
                field="text.text",
            )
        if segment.mode not in _MODES:
            raise InvalidArgument(f"unknown synthesis mode {segment.mode}", field="text.mode")
        if len(self.queue) >= self.settings.max_queued_segments:
            raise ResourceExhausted(
                f"{len(self.queue)} segments are already queued on this call; wait for "
                "segment_complete before sending more"
            )
        if self.stream_id is None:
            await self._open_stream()
        assert self.stream_id is not None
        spoken = normalize(segment.text, self.config.language)
        pieces = split_for_synthesis(spoken, self.settings.synthesis_chunk_chars)
        self.queue.append(
            _Segment(
                self.stream_id,
                segment_id,
                pieces,
                _MODES[segment.mode],
                segment.text,
                spoken,
                text_chars=len(segment.text),
                trace_context=dict(segment.trace_context),
            )
        )
        self.wake.set()

    async def _open_stream(self) -> None:
        self.stream_id = new_id("tts")
        self.stream_audio_ms = 0.0
        if self.telemetry.enabled:
            self.stream_span = self.telemetry.tracer.start_span(
                names.SPAN_TTS_STREAM,
                attributes={
                    names.ATTR_STREAM_ID: self.stream_id,
                    names.ATTR_BACKEND: self.backend.name,
                    names.ATTR_MODEL: self.backend.model_name,
                },
            )
        await self.duplex.send(
            Response(
                stream_created=tts_pb2.StreamCreated(
                    stream_id=self.stream_id,
                    sample_rate_hz=self.config.sample_rate_hz,
                    encoding=common_pb2.AUDIO_ENCODING_LINEAR16,
                    voice=self.config.voice.name,
                    language=self.config.language,
                    model=self.backend.model_name,
                    backend=self.backend.name,
                )
            )
        )

    async def _cancel(self) -> None:
        cancelled_id = self.stream_id or ""
        in_flight = self.speaking is not None and not self.speaking.done()
        dropped = len(self.queue) + int(in_flight)
        self.queue.clear()
        await cancel_and_wait(self.speaking)
        # Audio of this stream that was produced but not yet sent is dropped too.
        self.duplex.outbox.discard(lambda response: _stream_of(response) == cancelled_id)
        self.stream_id = None
        self.end_stream_span(cancelled=True)
        await self.duplex.send(
            Response(
                cancelled=tts_pb2.StreamCancelled(stream_id=cancelled_id, dropped_segments=dropped)
            )
        )
        log.info("stream %s cancelled; %d segments dropped", cancelled_id or "-", dropped)

    # ---- worker -------------------------------------------------------------------------------

    async def speak(self) -> None:
        """Speak queued segments in order; after `close`, send `done` and end the call."""
        try:
            while True:
                while not self.queue:
                    if self.closing:
                        await self._done()
                        return
                    self.wake.clear()
                    await self.wake.wait()
                segment = self.queue.popleft()
                self.speaking = asyncio.create_task(self._speak(segment))
                await asyncio.wait({self.speaking})
                if not self.speaking.cancelled() and self.speaking.exception() is not None:
                    raise self.speaking.exception()  # type: ignore[misc]
        finally:
            await cancel_and_wait(self.speaking)

    async def _done(self) -> None:
        await self.duplex.send(
            Response(
                done=tts_pb2.StreamDone(
                    stream_id=self.stream_id or "", total_audio_ms=self.stream_audio_ms
                )
            )
        )
        self.duplex.finish()
        self.end_stream_span(cancelled=False)

    def end_stream_span(self, cancelled: bool) -> None:
        """End the open stream's span (at done, cancel, or the end of the call)."""
        if self.stream_span is not None:
            self.stream_span.set_attribute(names.ATTR_AUDIO_MS, self.stream_audio_ms)
            self.stream_span.set_attribute(names.ATTR_CANCELLED, cancelled)
            self.stream_span.end()
            self.stream_span = None

    async def _speak(self, segment: _Segment) -> None:
        rate = self.config.sample_rate_hz
        resampler = StreamResampler(self.config.voice.sample_rate_hz, rate)
        max_samples = rate * _MAX_CHUNK_MS // 1000
        # Mapping the written words to the spoken ones takes a few ms for a long text full of
        # numbers: a worker thread does it while the first audio is made.
        mapping = asyncio.ensure_future(
            asyncio.to_thread(
                SegmentWords, segment.text, segment.spoken, segment.pieces, self.config.language
            )
        )
        sent = _SentAudio()
        voice_rate = self.config.voice.sample_rate_hz
        produced_ms = 0.0  # audio the backend yielded for this segment, in ms (any rate)
        try:
            for index, piece in enumerate(segment.pieces):
                job = SynthesisJob(piece, self.config.voice, self.config.language, segment.mode)
                audio = self.backend.synthesize(job)
                try:
                    async for item in audio:
                        if isinstance(item, TimedAudio):
                            sent.words = sent.words or await mapping
                            sent.words.on_audio(index, item.words, produced_ms, item.source)
                            samples = item.audio
                        else:
                            samples = item
                        produced_ms += duration_ms(samples.size, voice_rate)
                        await self._send_audio(segment, resampler.push(samples), max_samples, sent)
                finally:
                    await audio.aclose()
        except asyncio.CancelledError:
            if self.telemetry.enabled:
                self._trace(segment, sent, cancelled=True)
            raise
        finally:
            mapping.cancel()  # unless it was needed: a thread's work finishes there, unheard
        await self._send_audio(segment, resampler.flush(), max_samples, sent, last=True)
        if self.telemetry.enabled:
            self._trace(segment, sent, cancelled=False)
        audio_ms = duration_ms(sent.samples, rate)
        self.stream_audio_ms += audio_ms
        now = time.perf_counter()
        first = sent.first_at if sent.first_at is not None else now
        await self.duplex.send(
            Response(
                segment_complete=tts_pb2.SegmentComplete(
                    stream_id=segment.stream_id,
                    segment_id=segment.segment_id,
                    audio_ms=audio_ms,
                    timing=common_pb2.Timing(
                        ttfb_ms=1000 * (first - segment.received_at),
                        total_ms=1000 * (now - segment.received_at),
                    ),
                )
            )
        )

    def _trace(self, segment: _Segment, sent: _SentAudio, cancelled: bool) -> None:
        now = time.perf_counter()
        attributes: dict[str, object] = {
            names.ATTR_BACKEND: self.backend.name,
            names.ATTR_MODEL: self.backend.model_name,
            names.ATTR_STREAM_ID: segment.stream_id,
            names.ATTR_SEGMENT_ID: segment.segment_id,
            names.ATTR_MODE: segment.mode.value,
            names.ATTR_TEXT_CHARS: segment.text_chars,
            names.ATTR_AUDIO_MS: duration_ms(sent.samples, self.config.sample_rate_hz),
            names.ATTR_CANCELLED: cancelled,
        }
        if sent.first_at is not None:
            ttfb_ms = 1000 * (sent.first_at - segment.received_at)
            attributes[names.ATTR_TTFB_MS] = ttfb_ms
            self.telemetry.record_ttfb(
                names.METRIC_TTS_TTFB, ttfb_ms, {names.ATTR_BACKEND: self.backend.name}
            )
        if self.telemetry.record_content:
            attributes[names.ATTR_TEXT] = " ".join(segment.pieces)
        self.telemetry.span_between(
            names.SPAN_TTS_SEGMENT,
            segment.received_at,
            now,
            attributes,
            parent=context_from(segment.trace_context),
        )

    async def _send_audio(
        self,
        segment: _Segment,
        samples: np.ndarray,
        max_samples: int,
        sent: _SentAudio,
        last: bool = False,
    ) -> None:
        """Send `samples` in chunks, each with the words whose audio starts in it.

        Times are in ms, so resampling moves no word. With `last` (the segment's end), the last
        chunk takes every word still pending (a start rounded past the audio); if the segment's
        audio was all sent already, an empty chunk carries them, so that no word is lost.
        """
        rate = self.config.sample_rate_hz
        starts = list(range(0, samples.size, max_samples))
        if last and not starts and sent.chunks and sent.words and sent.words.pending:
            starts = [0]
        for number, start in enumerate(starts):
            piece = samples[start : start + max_samples]
            words: list[PlacedWord] = []
            if sent.words is None:
                pass  # the backend reported no word times (yet)
            elif last and number == len(starts) - 1:
                words = sent.words.take_rest()
            else:
                words = sent.words.take(duration_ms(sent.samples + piece.size, rate))
            await self.duplex.send(
                Response(
                    audio=tts_pb2.AudioChunk(
                        stream_id=segment.stream_id,
                        segment_id=segment.segment_id,
                        audio=float_to_pcm16(piece),
                        sequence=sent.chunks,
                        words=[_word_timing(word) for word in words],
                    )
                )
            )
            if sent.first_at is None:
                sent.first_at = time.perf_counter()
            sent.chunks += 1
            sent.samples += piece.size


@dataclass
class _SentAudio:
    chunks: int = 0
    samples: int = 0
    first_at: float | None = None
    words: SegmentWords | None = None  # once the backend reports word times


def _word_timing(word: PlacedWord) -> tts_pb2.WordTiming:
    return tts_pb2.WordTiming(
        word=word.word,
        text_offset=word.text_offset,
        start_ms=word.start_ms,
        end_ms=word.end_ms,
        source=_SOURCES[word.source],
    )


def _stream_of(response: Response) -> str | None:
    kind = response.WhichOneof("response")
    if kind == "audio":
        return response.audio.stream_id
    if kind == "segment_complete":
        return response.segment_complete.stream_id
    return None

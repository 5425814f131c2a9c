"""GrpcTTSService: Pipecat text-to-speech over one TtsService.Synthesize call per session.

- Adaptive mode: the first segment of a response is synthesised in STREAM mode (first audio
  soonest); later ones in BATCH mode, since the listener is already hearing audio by then.
- Each LLM chunk is one segment whose id names the chunk; `segment_complete` goes back upstream
  as a `SegmentCompleteFrame` so the LLM adapter releases the next chunk for exactly that one.
- After a segment that ends a sentence, 250 ms of silence follows its audio (never before the
  first audio of a response).
- What was heard: each word of a segment goes downstream as its own `TTSTextFrame`, placed in
  the audio stream where the word's audio starts (the server's `WordTiming`s; without them, an
  estimate from the word's characters). The output transport releases such a frame when the
  audio before it has been played, so the assistant aggregator after the transport holds exactly
  the words whose start was played when an interruption clears the rest (`bots.heard`).
- Interruption: `cancel` on the call; from then on, audio whose stream id is not the current
  stream's is dropped. The server acknowledges with `cancelled` and opens a new stream with the
  next text, so stale audio is recognised by id, never guessed from message order.
- A broken call (server restart) is re-opened with backoff (by the shared `GrpcCallService`) and
  the unfinished segments of the current response are sent again.
- A segment the server refuses (INVALID_ARGUMENT on a `text.*` field, e.g. too long) fails alone:
  an ErrorFrame names it, it counts as complete with no audio (so the LLM goes on), and the call
  is re-opened for the rest. The status does not say which segment it was; when several were in
  flight, they are sent again one at a time, each once the server has taken the one before, so
  that the one it refuses is known. Any other non-retryable status ends the session (see
  `bots.reconnecting`).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import grpc
from loguru import logger
from opentelemetry.trace import Span
from pipecat.frames.frames import (
    AggregatedTextFrame,
    AggregatedTextProgressFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.settings import ServiceSettings
from pipecat.utils.text.base_text_aggregator import TextType

from bots.frames import LLMChunkFrame, SegmentCompleteFrame
from bots.grpc_client import describe, refused_field, trace_metadata
from bots.reconnecting import GrpcCallService
from bots.tracing import ClientSpans
from nemotron.speech.v1 import common_pb2, tts_pb2, tts_pb2_grpc
from services.runtime.sentences import ends_sentence
from services.runtime.trace_types import (
    ATTR_AUDIO_MS,
    ATTR_CANCELLED,
    ATTR_SEGMENT_ID,
    ATTR_TTFB_MS,
    SPAN_BOT_TTS,
)

Request = tts_pb2.SynthesizeRequest
Response = tts_pb2.SynthesizeResponse

SENTENCE_PAUSE_S = 0.25

#: Speaking rate assumed for a server that sends no word timings, until the session has measured
#: its own from completed segments (characters of text per second of audio).
ESTIMATED_CHARS_PER_S = 14.0

_WORD = re.compile(r"\S+")


@dataclass
class _Segment:
    segment_id: str
    text: str
    mode: int
    ends_sentence: bool
    started: bool = False
    written: bool = False  # sent on the current call
    accepted: bool = False  # the current call's server took it (its audio or completion came)
    span: Span | None = None
    sent_at: float = field(default_factory=time.perf_counter)
    audio_ms: float = 0.0  # of this segment's audio pushed so far
    spoken_to: int = 0  # characters of the text pushed as word frames so far
    timed: bool = False  # the server sent word timings for this segment
    announced: AggregatedTextFrame | None = None


class GrpcTTSService(GrpcCallService[Request, Response]):
    """Speaks LLM chunks (or any text frames) through the mesh's TTS server.

    Args:
        target: The TTS server, e.g. "127.0.0.1:8001".
        voice: Voice name ("" for the server's default).
        language: Language code ("" for the voice's default).
        adaptive: STREAM for a response's first segment and BATCH after; False: STREAM always.
        sentence_pause_s: Silence after a segment that ends a sentence.
        segment_timeout_s: Longest wait for a response's remaining segments at its end.
        **kwargs: Passed to Pipecat's `AIService`.
    """

    label = "TTS"

    def __init__(
        self,
        *,
        target: str,
        voice: str = "",
        language: str = "",
        adaptive: bool = True,
        sentence_pause_s: float = SENTENCE_PAUSE_S,
        segment_timeout_s: float = 15.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("settings", ServiceSettings(model=None))  # the server picks the model
        super().__init__(target=target, **kwargs)
        self.voice = voice
        self.language = language
        self.adaptive = adaptive
        self.sentence_pause_s = sentence_pause_s
        self.segment_timeout_s = segment_timeout_s
        self.sample_rate = 0
        self.stream_id: str | None = None  # audio of any other stream is stale
        self._stream_open = False  # text was sent since the last cancel
        self._unacknowledged_cancels = 0  # until acknowledged, everything received is stale
        self.dropped_audio_chunks = 0
        self._one_at_a_time = False  # finding which of several segments the server refuses
        self._pending: OrderedDict[str, _Segment] = OrderedDict()
        self._all_spoken = asyncio.Event()
        self._all_spoken.set()
        self._segments_in_response = 0
        self._speaking = False
        self._text_ids = itertools.count()
        self._spans = ClientSpans(self)
        self._response = uuid.uuid4().hex[:8]
        #: Words of the current response's text given to this service (spoken or not).
        self.generated_words = 0
        self._measured_chars = 0  # text and audio of completed segments: the speaking rate
        self._measured_ms = 0.0
        self._estimate_logged = False

    def can_generate_metrics(self) -> bool:
        """TTFB (text sent to first audio) goes to Pipecat's metrics."""
        return True

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Speak at the pipeline's output rate (the server resamples)."""
        await super().setup(setup)
        self.sample_rate = setup.audio_out_sample_rate

    # ---- text in -------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Speak text; hold a response's end until its audio is out; cancel on interruption."""
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            await self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, LLMFullResponseStartFrame):
            self._response = uuid.uuid4().hex[:8]
            self._segments_in_response = 0
            self.generated_words = 0
            await self.push_frame(frame, direction)
        elif isinstance(frame, LLMFullResponseEndFrame):
            await self._finish_response()
            await self.push_frame(frame, direction)
        elif isinstance(frame, LLMChunkFrame):
            await self._speak(frame.segment_id, frame.text, frame.ends_sentence)
        elif isinstance(frame, TTSSpeakFrame) or (
            isinstance(frame, TextFrame) and type(frame) is not TTSTextFrame and not frame.skip_tts
        ):
            segment_id = f"{self._response}/t{next(self._text_ids)}"
            await self._speak(segment_id, frame.text, ends_sentence(frame.text))
            if isinstance(frame, TTSSpeakFrame):
                await self._finish_response()
        else:
            await self.push_frame(frame, direction)

    async def _speak(self, segment_id: str, text: str, ends_sentence: bool) -> None:
        if not self.is_usable:
            return  # the call ended for good, and said why once
        stream_first = self._segments_in_response == 0 or not self.adaptive
        mode = tts_pb2.SYNTHESIS_MODE_STREAM if stream_first else tts_pb2.SYNTHESIS_MODE_BATCH
        self._segments_in_response += 1
        self.generated_words += len(text.split())
        segment = _Segment(segment_id, text, mode, ends_sentence)
        segment.span = self._spans.start(SPAN_BOT_TTS, **{ATTR_SEGMENT_ID: segment_id})
        self._pending[segment_id] = segment
        self._all_spoken.clear()
        if stream_first:
            await self.start_ttfb_metrics()
        await self._send_waiting()

    async def _send_waiting(self) -> None:
        """Send the segments that are due, in order; the rest go when the call (re)opens."""
        while self.connected and (segment := self._next_to_send()) is not None:
            segment.written = True  # before the write, so that no other task sends it too
            if not await self._send(self._text_request(segment)):
                return  # the call broke; the next one re-sends what is unfinished
            # Set here, not in _speak: a segment re-sent on a re-opened call opens a stream too,
            # which an interruption must cancel.
            self._stream_open = True

    def _next_to_send(self) -> _Segment | None:
        """The first unsent segment; one at a time, none while a sent one is not yet taken."""
        segments = self._pending.values()
        if self._one_at_a_time and any(s.written and not s.accepted for s in segments):
            return None
        return next((s for s in segments if not s.written), None)

    @staticmethod
    def _text_request(segment: _Segment) -> Request:
        return Request(
            text=tts_pb2.TextSegment(
                segment_id=segment.segment_id,
                text=segment.text,
                mode=segment.mode,  # type: ignore[arg-type]
                trace_context=ClientSpans.carrier(segment.span),
            )
        )

    async def _finish_response(self) -> None:
        """Wait until every segment of the response has produced its audio."""
        try:
            await asyncio.wait_for(self._all_spoken.wait(), self.segment_timeout_s)
        except TimeoutError:
            await self.push_error(
                f"TTS did not complete {len(self._pending)} segment(s) within "
                f"{self.segment_timeout_s:g} s; dropping them"
            )
            self._forget_pending()
        if self._speaking:
            self._speaking = False
            await self.push_frame(TTSStoppedFrame())

    async def _interrupt(self) -> None:
        """Cancel the stream on the server and drop its audio from here on."""
        self.stream_id = None
        self._forget_pending()
        self._speaking = False
        if self._stream_open and self.connected:
            self._stream_open = False
            if await self._send(Request(cancel=tts_pb2.CancelStream())):
                self._unacknowledged_cancels += 1

    def _forget_pending(self) -> None:
        for segment in self._pending.values():
            ClientSpans.end(segment.span, **{ATTR_CANCELLED: True})
        self._pending.clear()
        self._settle()

    def _settle(self) -> None:
        """Once nothing is pending, the response is spoken and no refused segment is sought."""
        if not self._pending:
            self._all_spoken.set()
            self._one_at_a_time = False

    # ---- the call ------------------------------------------------------------------------------

    def _new_call(self, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
        return tts_pb2_grpc.TtsServiceStub(channel).Synthesize(metadata=trace_metadata())

    async def _on_open(self, call: grpc.aio.StreamStreamCall) -> bool:
        """Send the config, then the unfinished segments (and those that came meanwhile)."""
        await call.write(
            Request(
                config=tts_pb2.SynthesisConfig(
                    voice=self.voice,
                    language=self.language,
                    sample_rate_hz=self.sample_rate,
                    encoding=common_pb2.AUDIO_ENCODING_LINEAR16,
                )
            )
        )
        for pending in self._pending.values():
            pending.written = pending.accepted = False
        while (segment := self._next_to_send()) is not None:
            segment.written = True
            await call.write(self._text_request(segment))
            self._stream_open = True
        return True

    async def _on_response(self, response: Response) -> bool:
        kind = response.WhichOneof("response")
        if kind in ("audio", "segment_complete"):
            segment = self._pending.get(getattr(response, kind).segment_id)
            if segment is not None and not segment.accepted:
                segment.accepted = True
                if self._one_at_a_time:
                    await self._send_waiting()
        await self._handle(response)
        return False

    async def _on_close(self) -> None:
        self.stream_id = None
        self._stream_open = False
        self._unacknowledged_cancels = 0

    async def _on_fault(self, error: grpc.aio.AioRpcError) -> bool:
        """A refused segment fails alone; any other fault ends the session (nothing is spoken)."""
        refused = error.code() == grpc.StatusCode.INVALID_ARGUMENT
        if not (refused and refused_field(error).startswith("text.")):
            self._forget_pending()
            return False
        suspects = [s for s in self._pending.values() if s.written and not s.accepted]
        if len(suspects) == 1:
            await self._fail_segment(suspects[0], error)
        elif suspects:
            self._one_at_a_time = True
            logger.warning(
                f"{self}: the TTS server refused one of {len(suspects)} segments "
                f"({describe(error)}); sending them again one at a time"
            )
        return True

    async def _fail_segment(self, segment: _Segment, error: grpc.aio.AioRpcError) -> None:
        """Drop a refused segment: report it, and complete it with no audio so the LLM goes on."""
        del self._pending[segment.segment_id]
        ClientSpans.end(segment.span, **{ATTR_CANCELLED: True})
        await self.push_error(
            f"TTS refused segment {segment.segment_id}: {describe(error)}; skipping it"
        )
        await self.push_frame(
            SegmentCompleteFrame(segment_id=segment.segment_id, audio_ms=0.0),
            FrameDirection.UPSTREAM,
        )
        self._settle()

    async def _handle(self, response: tts_pb2.SynthesizeResponse) -> None:
        kind = response.WhichOneof("response")
        if kind == "cancelled":
            self._unacknowledged_cancels = max(0, self._unacknowledged_cancels - 1)
            logger.debug(f"{self}: stream {response.cancelled.stream_id} cancelled")
        elif self._unacknowledged_cancels:
            if kind == "audio":
                self.dropped_audio_chunks += 1
        elif kind == "stream_created":
            self.stream_id = response.stream_created.stream_id
        elif kind == "audio":
            await self._on_audio(response.audio)
        elif kind == "segment_complete":
            await self._on_segment_complete(response.segment_complete)

    async def _on_audio(self, chunk: tts_pb2.AudioChunk) -> None:
        segment = self._pending.get(chunk.segment_id)
        if chunk.stream_id != self.stream_id or segment is None:
            self.dropped_audio_chunks += 1
            return
        if not segment.started:
            segment.started = True
            if segment.span is not None:
                segment.span.set_attribute(
                    ATTR_TTFB_MS, 1000 * (time.perf_counter() - segment.sent_at)
                )
            await self.stop_ttfb_metrics()
            if not self._speaking:
                self._speaking = True
                await self.push_frame(TTSStartedFrame())
            # The segment as a whole, for RTVI's bot-output ("new"); its words follow as they
            # are played. The context is built from the words, not from this.
            announced = AggregatedTextFrame(segment.text, TextType.SENTENCE)
            announced.will_be_spoken = True  # as Pipecat's TTS services mark it
            announced.append_to_context = False
            segment.announced = announced
            await self.push_frame(announced)
        if chunk.words:
            segment.timed = True
        starts = self._word_starts(segment, chunk)
        audio = chunk.audio
        bytes_per_ms = 2 * self.sample_rate / 1000
        chunk_ms = len(audio) / bytes_per_ms
        cut = 0
        for offset, end, start_ms in starts:
            at = min(
                len(audio), max(cut, 2 * round((start_ms - segment.audio_ms) * bytes_per_ms / 2))
            )
            if at > cut:
                await self._push_audio(audio[cut:at], segment)
                cut = at
            await self._push_words(segment, offset, end)
        if cut < len(audio):
            await self._push_audio(audio[cut:], segment)
        segment.audio_ms += chunk_ms

    def _word_starts(
        self, segment: _Segment, chunk: tts_pb2.AudioChunk
    ) -> list[tuple[int, int, float]]:
        """(text offset, end, start ms) of the words whose audio starts in `chunk`, in order.

        The server's timings when it sends them; otherwise each word's start is estimated from
        the characters before it and the session's speaking rate.
        """
        if segment.timed:
            return [
                (w.text_offset, w.text_offset + len(w.word), w.start_ms)
                for w in chunk.words
                if w.text_offset >= segment.spoken_to
            ]
        if not self._estimate_logged:
            self._estimate_logged = True
            logger.info(
                f"{self}: the TTS server sends no word timings; placing words by an estimate "
                f"from their characters ({self._chars_per_s():.1f} chars/s)"
            )
        chunk_end_ms = segment.audio_ms + len(chunk.audio) / (2 * self.sample_rate / 1000)
        ms_per_char = 1000 / self._chars_per_s()
        starts = []
        for word in _WORD.finditer(segment.text, segment.spoken_to):
            start_ms = word.start() * ms_per_char
            if start_ms >= chunk_end_ms:
                break
            starts.append((word.start(), word.end(), start_ms))
        return starts

    def _chars_per_s(self) -> float:
        if self._measured_ms < 2000:  # too little audio measured yet to trust
            return ESTIMATED_CHARS_PER_S
        return 1000 * self._measured_chars / self._measured_ms

    async def _push_audio(self, audio: bytes, segment: _Segment) -> None:
        await self.push_frame(
            TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=segment.segment_id)
        )

    async def _push_words(self, segment: _Segment, offset: int, end: int) -> None:
        """Push the text up to `end` (from where the last word ended) as one spoken word.

        The piece carries the spaces before the word, so that the aggregator's concatenation of
        all pieces is the segment's text exactly.
        """
        end = min(len(segment.text), max(end, offset + 1))
        if not segment.text[end:].strip():
            end = len(segment.text)  # what follows the last word goes with it
        piece = segment.text[segment.spoken_to : end]
        if not piece.strip():
            return
        segment.spoken_to = end
        word = TTSTextFrame(piece, text_type=TextType.WORD)
        word.includes_inter_frame_spaces = True
        word.will_be_spoken = True
        word.context_id = segment.segment_id
        announced = segment.announced
        if announced is not None:
            word.segment_id = announced.id
        await self.push_frame(word)
        if announced is not None:
            await self.push_frame(
                AggregatedTextProgressFrame(
                    segment_id=announced.id,
                    context_id=segment.segment_id,
                    text=segment.text,
                    text_type=TextType.SENTENCE,
                    accumulated_text=segment.text[: segment.spoken_to].strip(),
                    remaining_text=segment.text[segment.spoken_to :].strip(),
                )
            )

    async def _on_segment_complete(self, complete: tts_pb2.SegmentComplete) -> None:
        if complete.stream_id != self.stream_id:
            return
        segment = self._pending.pop(complete.segment_id, None)
        if segment is None:
            return
        ClientSpans.end(segment.span, **{ATTR_AUDIO_MS: complete.audio_ms})
        if segment.started:
            # Words the timings left out (none, by the contract) count as spoken at the end.
            if segment.spoken_to < len(segment.text):
                await self._push_words(segment, segment.spoken_to, len(segment.text))
            if not segment.timed and complete.audio_ms > 0:
                self._measured_chars += len(segment.text.strip())
                self._measured_ms += complete.audio_ms
        if segment.ends_sentence and segment.started and self.sentence_pause_s > 0:
            silence = bytes(2 * int(self.sample_rate * self.sentence_pause_s))
            await self.push_frame(
                TTSAudioRawFrame(silence, self.sample_rate, 1, context_id=complete.segment_id)
            )
        await self.push_frame(
            SegmentCompleteFrame(segment_id=complete.segment_id, audio_ms=complete.audio_ms),
            FrameDirection.UPSTREAM,
        )
        self._settle()

"""GrpcTTSService: Pipecat text-to-speech over one TtsService.Synthesize call per session.

- Adaptive mode: the first segment of a response is synthesised in STREAM mode (first audio
  soonest); later ones in BATCH mode, since the listener is already hearing audio by then.
- Each LLM chunk is one segment whose id names the chunk; `segment_complete` goes back upstream
  as a `SegmentCompleteFrame` so the LLM adapter releases the next chunk for exactly that one.
- After a segment that ends a sentence, 250 ms of silence follows its audio (never before the
  first audio of a response).
- Interruption: `cancel` on the call; from then on, audio whose stream id is not the current
  stream's is dropped. The server acknowledges with `cancelled` and opens a new stream with the
  next text, so stale audio is recognised by id, never guessed from message order.
- A broken call (server restart) is re-opened with backoff and the unfinished segments of the
  current response are sent again.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import grpc
from loguru import logger
from opentelemetry.trace import Span
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    StartFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings
from pipecat.utils.text.base_text_aggregator import TextType

from bots.frames import LLMChunkFrame, SegmentCompleteFrame
from bots.grpc_client import Backoff, describe, is_retryable, open_channel, trace_metadata
from bots.tracing import ClientSpans
from nemotron.speech.v1 import common_pb2, tts_pb2, tts_pb2_grpc
from services.runtime.trace_types import (
    ATTR_AUDIO_MS,
    ATTR_CANCELLED,
    ATTR_SEGMENT_ID,
    ATTR_TTFB_MS,
    SPAN_BOT_TTS,
)

Request = tts_pb2.SynthesizeRequest

SENTENCE_PAUSE_S = 0.25
SENTENCE_ENDS = (".", "!", "?", '."', '!"', '?"', ".)", "!)", "?)")


@dataclass
class _Segment:
    segment_id: str
    text: str
    mode: int
    ends_sentence: bool
    started: bool = False
    span: Span | None = None
    sent_at: float = field(default_factory=time.perf_counter)


class GrpcTTSService(AIService):
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
        super().__init__(**kwargs)
        self.target = target
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
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._pending: OrderedDict[str, _Segment] = OrderedDict()
        self._all_spoken = asyncio.Event()
        self._all_spoken.set()
        self._segments_in_response = 0
        self._speaking = False
        self._text_ids = itertools.count()
        self._spans = ClientSpans(self)
        self._response = uuid.uuid4().hex[:8]

    def can_generate_metrics(self) -> bool:
        """TTFB (text sent to first audio) goes to Pipecat's metrics."""
        return True

    async def start(self, frame: StartFrame) -> None:
        """Open the channel and keep a synthesis call open at the pipeline's output rate."""
        await super().start(frame)
        self._channel = open_channel(self.target)
        self._session_task = self.create_task(self._keep_session(), "grpc-tts-session")

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Speak at the pipeline's output rate (the server resamples)."""
        await super().setup(setup)
        self.sample_rate = setup.audio_out_sample_rate

    async def stop(self, frame: EndFrame) -> None:
        """Close the call and the channel."""
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        """Close the call and the channel at once."""
        await super().cancel(frame)
        await self._close()

    async def _close(self) -> None:
        if self._session_task is not None:
            await self.cancel_task(self._session_task)
            self._session_task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

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
            await self._speak(segment_id, frame.text, frame.text.rstrip().endswith(SENTENCE_ENDS))
            if isinstance(frame, TTSSpeakFrame):
                await self._finish_response()
        else:
            await self.push_frame(frame, direction)

    async def _speak(self, segment_id: str, text: str, ends_sentence: bool) -> None:
        stream_first = self._segments_in_response == 0 or not self.adaptive
        mode = tts_pb2.SYNTHESIS_MODE_STREAM if stream_first else tts_pb2.SYNTHESIS_MODE_BATCH
        self._segments_in_response += 1
        segment = _Segment(segment_id, text, mode, ends_sentence)
        segment.span = self._spans.start(SPAN_BOT_TTS, **{ATTR_SEGMENT_ID: segment_id})
        self._pending[segment_id] = segment
        self._all_spoken.clear()
        if stream_first:
            await self.start_ttfb_metrics()
        await self._send_segment(segment)

    async def _send_segment(self, segment: _Segment) -> None:
        call = self._call
        if call is None or not self._connected.is_set():
            return  # sent when the call (re)opens
        try:
            await call.write(
                Request(
                    text=tts_pb2.TextSegment(
                        segment_id=segment.segment_id,
                        text=segment.text,
                        mode=segment.mode,  # type: ignore[arg-type]
                        trace_context=ClientSpans.carrier(segment.span),
                    )
                )
            )
            # Set here, not in _speak: a segment re-sent on a re-opened call opens a stream too,
            # which an interruption must cancel.
            self._stream_open = True
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            logger.debug(f"{self}: segment {segment.segment_id} waits for the call: {error}")

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
        call = self._call
        if self._stream_open and call is not None:
            self._stream_open = False
            try:
                await call.write(Request(cancel=tts_pb2.CancelStream()))
                self._unacknowledged_cancels += 1
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                logger.debug(f"{self}: cancel not sent: {error}")

    def _forget_pending(self) -> None:
        for segment in self._pending.values():
            ClientSpans.end(segment.span, **{ATTR_CANCELLED: True})
        self._pending.clear()
        self._all_spoken.set()

    # ---- the call ------------------------------------------------------------------------------

    async def _keep_session(self) -> None:
        """Hold one Synthesize call open; re-open it with backoff when it breaks."""
        backoff = Backoff()
        while True:
            try:
                await self._run_call(backoff)
                logger.info(f"{self}: the TTS server ended the call; re-opening")
            except grpc.aio.AioRpcError as error:
                if not is_retryable(error):
                    await self.push_error(f"TTS call failed: {describe(error)}")
                    self._forget_pending()
                    if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        continue  # a bad segment fails the call, not the session
                    return
                logger.warning(f"{self}: TTS at {self.target}: {describe(error)}; retrying")
            finally:
                self._connected.clear()
                self._call = None
                self.stream_id = None
                self._stream_open = False
                self._unacknowledged_cancels = 0
            await asyncio.sleep(backoff.next_delay())

    async def _run_call(self, backoff: Backoff) -> None:
        assert self._channel is not None
        call = tts_pb2_grpc.TtsServiceStub(self._channel).Synthesize(metadata=trace_metadata())
        try:
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
            self._call = call
            self._connected.set()
            for segment in list(self._pending.values()):
                await self._send_segment(segment)
            while (response := await call.read()) is not grpc.aio.EOF:
                backoff.reset()
                await self._handle(response)
        finally:
            call.cancel()

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
            await self.push_frame(TTSTextFrame(segment.text, text_type=TextType.SENTENCE))
        await self.push_frame(
            TTSAudioRawFrame(chunk.audio, self.sample_rate, 1, context_id=chunk.segment_id)
        )

    async def _on_segment_complete(self, complete: tts_pb2.SegmentComplete) -> None:
        if complete.stream_id != self.stream_id:
            return
        segment = self._pending.pop(complete.segment_id, None)
        if segment is None:
            return
        ClientSpans.end(segment.span, **{ATTR_AUDIO_MS: complete.audio_ms})
        if segment.ends_sentence and segment.started and self.sentence_pause_s > 0:
            silence = bytes(2 * int(self.sample_rate * self.sentence_pause_s))
            await self.push_frame(
                TTSAudioRawFrame(silence, self.sample_rate, 1, context_id=complete.segment_id)
            )
        await self.push_frame(
            SegmentCompleteFrame(segment_id=complete.segment_id, audio_ms=complete.audio_ms),
            FrameDirection.UPSTREAM,
        )
        if not self._pending:
            self._all_spoken.set()

"""GrpcSTTService: Pipecat speech-to-text over one AsrService.StreamingRecognize call per session.

Turn handling, the part that decides voice-to-voice latency:

- VAD stop (the user paused): a *soft* finalize. The server answers at once with its current
  hypothesis, which becomes an interim transcription; the utterance goes on.
- Turn end (SmartTurn or the VAD timeout, announced by the `UserTurnProcessor` upstream as a
  `UserStoppedSpeakingFrame`): a real finalize with a fresh utterance id. The stop frame is held
  until the final transcript of that utterance id has arrived (or `finalize_timeout_s` passed), so
  the LLM never starts on a partial transcript.

The call is opened at pipeline start and re-opened with backoff whenever it breaks (server
restart, server down at start, a stall past the deadline); audio that arrives meanwhile is
dropped, never queued without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncGenerator

import grpc
from loguru import logger
from opentelemetry.trace import Span
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterimTranscriptionFrame,
    StartFrame,
    TranscriptionFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import STTService
from pipecat.utils.time import time_now_iso8601

from bots.grpc_client import Backoff, describe, is_retryable, open_channel, trace_metadata
from bots.tracing import ClientSpans
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, common_pb2
from services.runtime.trace_types import ATTR_CANCELLED, ATTR_UTTERANCE_ID, SPAN_BOT_STT

Request = asr_pb2.StreamingRecognizeRequest


class GrpcSTTService(STTService):
    """Streams the user's audio to the mesh's ASR server and turns its results into frames.

    Interim results become `InterimTranscriptionFrame`s; only the final transcript of a finalize
    becomes a `TranscriptionFrame` (with `finalized=True`).

    Args:
        target: The ASR server, e.g. "127.0.0.1:8080".
        language: Language code sent in the recognition config.
        interim_results: Ask the server for interim hypotheses while the user speaks.
        finalize_timeout_s: Longest hold of the user-stopped-speaking frame for the final.
        ready_timeout_s: Deadline for the server's `ready` after the config; past it the call
            counts as stalled and is re-opened.
        max_pending_audio: Audio chunks buffered while the server is slow; older ones are
            dropped beyond this.
        **kwargs: Passed to Pipecat's `STTService`.
    """

    def __init__(
        self,
        *,
        target: str,
        language: str = "en",
        interim_results: bool = True,
        finalize_timeout_s: float = 1.0,
        ready_timeout_s: float = 5.0,
        max_pending_audio: int = 100,
        **kwargs: object,
    ) -> None:
        kwargs.setdefault("ttfs_p99_latency", 0.6)
        # The server reports its model in `ready`; language is ours to choose.
        kwargs.setdefault("settings", STTSettings(model=None, language=language))
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.target = target
        self.language = language
        self.interim_results = interim_results
        self.finalize_timeout_s = finalize_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.session_id = ""
        self._channel: grpc.aio.Channel | None = None
        self._outbox: asyncio.Queue[Request] = asyncio.Queue(max_pending_audio)
        self._connected = asyncio.Event()
        self._session_task: asyncio.Task[None] | None = None
        self._finals: dict[str, asyncio.Future[str]] = {}
        self._utterances = itertools.count(1)
        self._conversation = uuid.uuid4().hex[:8]
        self._spans = ClientSpans(self)

    def can_generate_metrics(self) -> bool:
        """TTFB (speech end to final transcript) is reported through Pipecat's metrics."""
        return True

    @property
    def connected(self) -> bool:
        """Whether a recognition call is open and ready."""
        return self._connected.is_set()

    async def start(self, frame: StartFrame) -> None:
        """Open the channel and keep a recognition call open for the session."""
        await super().start(frame)
        self._channel = open_channel(self.target)
        self._session_task = self.create_task(self._keep_session(), "grpc-stt-session")

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
        self._connected.clear()

    # ---- audio in ------------------------------------------------------------------------------

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Queue one audio chunk for the server; results arrive on the reader."""
        if self.connected:
            self._offer(Request(audio=audio))
        yield None

    def _offer(self, request: Request) -> None:
        """Queue a request; a slow server loses the oldest audio, never a finalize."""
        while self._outbox.full():
            dropped = self._outbox.get_nowait()
            if dropped.WhichOneof("request") != "audio":
                self._outbox.put_nowait(dropped)  # keep control messages; drop this audio
                return
        self._outbox.put_nowait(request)

    # ---- turn handling -------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Soft finalize on VAD stop; real finalize, then the held stop frame, on turn end."""
        if isinstance(frame, UserStoppedSpeakingFrame) and direction == FrameDirection.DOWNSTREAM:
            await super(STTService, self).process_frame(frame, direction)
            await self._finish_turn(frame)
            return
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStoppedSpeakingFrame) and self.connected:
            self._offer(Request(finalize=asr_pb2.Finalize(soft=True)))

    async def _finish_turn(self, stopped: UserStoppedSpeakingFrame) -> None:
        if not self.connected:
            await self.push_frame(stopped)
            return
        utterance_id = f"{self._conversation}-{next(self._utterances)}"
        final: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._finals[utterance_id] = final
        span = self._spans.start(SPAN_BOT_STT, **{ATTR_UTTERANCE_ID: utterance_id})
        self._offer(
            Request(
                finalize=asr_pb2.Finalize(
                    utterance_id=utterance_id, trace_context=ClientSpans.carrier(span)
                )
            )
        )
        self.create_task(
            self._release_after_final(stopped, utterance_id, final, span), "grpc-stt-hold"
        )

    async def _release_after_final(
        self,
        stopped: UserStoppedSpeakingFrame,
        utterance_id: str,
        final: asyncio.Future[str],
        span: Span | None,
    ) -> None:
        sent = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.shield(final), self.finalize_timeout_s)
            ClientSpans.end(span, ttfb_ms=1000 * (time.perf_counter() - sent))
        except TimeoutError:
            ClientSpans.end(span, **{ATTR_CANCELLED: True})
            logger.warning(
                f"{self}: no final transcript for {utterance_id} within "
                f"{self.finalize_timeout_s:g} s; ending the turn with what arrived"
            )
        finally:
            self._finals.pop(utterance_id, None)
        await self.push_frame(stopped)

    # ---- the call ------------------------------------------------------------------------------

    async def _keep_session(self) -> None:
        """Hold one StreamingRecognize call open; re-open it with backoff when it breaks."""
        backoff = Backoff()
        while True:
            try:
                await self._run_call(backoff)
                logger.info(f"{self}: the ASR server ended the stream; re-opening")
            except grpc.aio.AioRpcError as error:
                if not is_retryable(error):
                    await self.push_error(f"ASR stream failed: {describe(error)}")
                    return
                logger.warning(f"{self}: ASR at {self.target}: {describe(error)}; retrying")
            except TimeoutError as error:
                logger.warning(f"{self}: ASR at {self.target}: {describe(error)}; retrying")
            finally:
                self._connected.clear()
                self._release_all_finals()
            await asyncio.sleep(backoff.next_delay())

    async def _run_call(self, backoff: Backoff) -> None:
        assert self._channel is not None
        call = asr_pb2_grpc.AsrServiceStub(self._channel).StreamingRecognize(
            metadata=trace_metadata()
        )
        writer: asyncio.Task[None] | None = None
        try:
            await call.write(
                Request(
                    config=asr_pb2.RecognitionConfig(
                        sample_rate_hz=self.sample_rate,
                        encoding=common_pb2.AUDIO_ENCODING_LINEAR16,
                        language=self.language,
                        interim_results=self.interim_results,
                    )
                )
            )
            ready = await asyncio.wait_for(call.read(), self.ready_timeout_s)
            if ready is grpc.aio.EOF:
                return
            self.session_id = ready.ready.session_id
            logger.info(
                f"{self}: ASR session {self.session_id} ({ready.ready.backend}, "
                f"{ready.ready.model}) at {self.target}"
            )
            self._drain_outbox()
            self._connected.set()
            backoff.reset()
            await self._call_event_handler("on_connected")
            writer = asyncio.create_task(self._write(call))
            while (response := await call.read()) is not grpc.aio.EOF:
                await self._handle(response.transcript)
        finally:
            if writer is not None:
                writer.cancel()
            call.cancel()
            if self.session_id:
                await self._call_event_handler("on_disconnected")

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            request = await self._outbox.get()
            await call.write(request)

    def _drain_outbox(self) -> None:
        """Forget audio from before this call: it belongs to a stream that no longer exists."""
        while not self._outbox.empty():
            self._outbox.get_nowait()

    async def _handle(self, transcript: asr_pb2.Transcript) -> None:
        if transcript.is_final:
            if transcript.text.strip():
                await self.push_frame(
                    TranscriptionFrame(
                        transcript.text.strip(),
                        self._user_id,
                        time_now_iso8601(),
                        result=transcript,
                        finalized=True,
                    )
                )
            final = self._finals.get(transcript.utterance_id)
            if final is not None and not final.done():
                final.set_result(transcript.text)
        elif transcript.text.strip():
            await self.push_frame(
                InterimTranscriptionFrame(
                    transcript.text.strip(), self._user_id, time_now_iso8601(), result=transcript
                )
            )

    def _release_all_finals(self) -> None:
        """A broken call answers no finalize: release every held turn now."""
        for final in self._finals.values():
            if not final.done():
                final.set_result("")

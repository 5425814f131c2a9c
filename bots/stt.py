"""GrpcSTTService: Pipecat speech-to-text over one AsrService.StreamingRecognize call per session.

Turn handling, the part that decides voice-to-voice latency:

- VAD stop (the user paused): a *soft* finalize. The server answers at once with its current
  hypothesis, which becomes an interim transcription; the utterance goes on.
- Turn end (SmartTurn or the VAD timeout, announced by the `UserTurnProcessor` upstream as a
  `UserStoppedSpeakingFrame`): a real finalize with a fresh utterance id. The stop frame is held
  until the final transcript of that utterance id has arrived (or `finalize_timeout_s` passed), so
  the LLM never starts on a partial transcript.

The call is opened at pipeline start and re-opened with backoff whenever it breaks (server
restart, server down at start, a stall past the deadline), by the shared `GrpcCallService`; audio
that arrives meanwhile is dropped, never queued without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from loguru import logger
from opentelemetry.trace import Span
from pipecat.frames.frames import (
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import STTService
from pipecat.utils.time import time_now_iso8601

from bots.grpc_client import refused_field, trace_metadata
from bots.reconnecting import GrpcCallService
from bots.tracing import ClientSpans
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, common_pb2
from services.runtime.trace_types import ATTR_CANCELLED, ATTR_UTTERANCE_ID, SPAN_BOT_STT

Request = asr_pb2.StreamingRecognizeRequest
Response = asr_pb2.StreamingRecognizeResponse


class GrpcSTTService(GrpcCallService[Request, Response], STTService):
    """Streams the user's audio to the mesh's ASR server and turns its results into frames.

    Interim results become `InterimTranscriptionFrame`s; only the final transcript of a finalize
    becomes a `TranscriptionFrame` (with `finalized=True`).

    Args:
        target: The ASR server, e.g. "127.0.0.1:8080".
        language: Language code sent in the recognition config.
        interim_results: Ask the server for interim hypotheses while the user speaks.
        word_timestamps: Ask for the times of the words (`Transcript.words`), on the clock of
            the audio sent (`audio_ms`): the barge-in gate counts only the words said since the
            user started (`bots.barge_in`), not the bot's echo heard before.
        finalize_timeout_s: Longest hold of the user-stopped-speaking frame for the final.
        ready_timeout_s: Deadline for the server's `ready` after the config; past it the call
            counts as stalled and is re-opened.
        max_pending_audio: Audio chunks buffered while the server is slow; older ones are
            dropped beyond this.
        **kwargs: Passed to Pipecat's `STTService`.
    """

    label = "ASR"

    def __init__(
        self,
        *,
        target: str,
        language: str = "en",
        interim_results: bool = True,
        word_timestamps: bool = False,
        finalize_timeout_s: float = 1.0,
        ready_timeout_s: float = 5.0,
        max_pending_audio: int = 100,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("ttfs_p99_latency", 0.6)
        # The server reports its model in `ready`; language is ours to choose.
        kwargs.setdefault("settings", STTSettings(model=None, language=language))
        super().__init__(target=target, outbox_size=max_pending_audio, **kwargs)
        self.language = language
        self.interim_results = interim_results
        self.word_timestamps = word_timestamps
        self._sent_samples = 0  # audio offered on this call: the clock of its word times
        self.finalize_timeout_s = finalize_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.session_id = ""
        self._finals: dict[str, asyncio.Future[str]] = {}
        self._utterances = itertools.count(1)
        self._conversation = uuid.uuid4().hex[:8]
        self._spans = ClientSpans(self)

    def can_generate_metrics(self) -> bool:
        """TTFB (speech end to final transcript) is reported through Pipecat's metrics."""
        return True

    # ---- audio in ------------------------------------------------------------------------------

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Queue one audio chunk for the server; results arrive on the reader."""
        if self.connected:
            self._offer(Request(audio=audio))
            self._sent_samples += len(audio) // 2
        yield None

    def audio_ms(self) -> int:
        """Milliseconds of audio sent on the current call.

        Where the audio arriving now lies on the clock of the server's word times (a reconnect
        starts it again at 0).
        """
        return 1000 * self._sent_samples // max(1, self.sample_rate)

    def _droppable(self, request: Request) -> bool:
        """A slow server loses the oldest audio, never a finalize."""
        return bool(request.WhichOneof("request") == "audio")

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

    def _new_call(self, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
        return asr_pb2_grpc.AsrServiceStub(channel).StreamingRecognize(metadata=trace_metadata())

    async def _on_open(self, call: grpc.aio.StreamStreamCall) -> bool:
        """Send the config; the server's `ready` must follow within `ready_timeout_s`."""
        await call.write(
            Request(
                config=asr_pb2.RecognitionConfig(
                    sample_rate_hz=self.sample_rate,
                    encoding=common_pb2.AUDIO_ENCODING_LINEAR16,
                    language=self.language,
                    interim_results=self.interim_results,
                    word_timestamps=self.word_timestamps,
                )
            )
        )
        self._sent_samples = 0
        ready = await self._read(call, self.ready_timeout_s)
        if ready is grpc.aio.EOF:
            return False
        self.session_id = ready.ready.session_id
        logger.info(
            f"{self}: ASR session {self.session_id} ({ready.ready.backend}, "
            f"{ready.ready.model}) at {self.target}"
        )
        return True

    async def _on_fault(self, error: grpc.aio.AioRpcError) -> bool:
        """A server whose backend cannot time words: go on without word times (re-open)."""
        if (
            self.word_timestamps
            and error.code() == grpc.StatusCode.INVALID_ARGUMENT
            and refused_field(error) == "config.word_timestamps"
        ):
            self.word_timestamps = False
            logger.warning(
                f"{self}: the ASR at {self.target} gives no word times ({error.details()}); "
                "barge-ins count every word of the transcript, echo heard before included"
            )
            return True
        return False

    async def _on_response(self, response: Response) -> bool:
        await self._handle(response.transcript)
        return False

    async def _on_close(self) -> None:
        self._release_all_finals()

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

"""One simulated caller: a whole voice conversation against running ASR, LLM and TTS servers.

Each turn streams the question's audio in 20 ms frames (at real time, or faster by `speed`),
finalizes, sends the transcript with the conversation so far to the LLM with wait_for_continue,
speaks every chunk through TTS, and releases the next chunk when its segment_complete arrives,
as a voice bot does, then hears the reply out before the next question, as a person does. The
ASR stream asks for interim results, as the voice bots do. The turn latency is finalize sent ->
first reply audio received: the part of voice-to-voice latency that the servers own.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from clients.channel import open_channel
from clients.retry import Backoff, is_retryable
from clients.security import ClientSecurity
from clients.targets import Targets
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, llm_pb2, llm_pb2_grpc, tts_pb2, tts_pb2_grpc

FRAME_MS = 20
SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short sentences."


@dataclass(frozen=True)
class CallPlan:
    """How every simulated caller behaves."""

    speed: float = 1.0  # audio streaming speed; 1 is real time
    # A turn whose work (speech in, transcript, reply synthesized) takes longer fails with
    # DEADLINE_EXCEEDED; hearing the reply out comes after it.
    deadline_s: float = 60.0
    interim_results: bool = True  # ask the ASR for interims, as the voice bots do
    listen: bool = True  # hear the reply out (at `speed`) before asking the next question
    # Callers call in one after another over the question's length, as people do, rather than
    # all finalizing in the same 20 ms (which measures a thundering herd, not a load).
    stagger: bool = True
    # TLS and token of the callers' channels (None: NEMOTRON_TLS_* and NEMOTRON_TOKEN* variables).
    security: ClientSecurity | None = None


@dataclass
class TurnResult:
    """Timings of one turn, in milliseconds (NaN-free: a failed turn records its error)."""

    asr_ttfb_ms: float = 0.0  # finalize sent -> final transcript
    llm_ttfb_ms: float = 0.0  # start sent -> first chunk
    tts_ttfb_ms: float = 0.0  # first chunk's text sent -> its first audio
    turn_ms: float = 0.0  # finalize sent -> first reply audio
    reply_audio_ms: float = 0.0
    synthesis_ms: float = 0.0  # first text sent -> last segment_complete
    error: str = ""
    detail: str = ""  # what the failure said
    failed_at: float = 0.0  # perf_counter() when a failed turn failed
    finalized_at: float = 0.0  # perf_counter() when the finalize was sent


@dataclass(frozen=True)
class Reopen:
    """The caller's streams broke (a replica died or drained) and were opened again elsewhere."""

    broke_at: float  # perf_counter() when the break was noticed
    reopened_at: float  # perf_counter() when the new streams took requests (0: never)
    lost_turn: bool  # the break cost the turn in flight (else it came between turns)


@dataclass
class CallerResult:
    """All turns of one caller, and the times its streams were opened again."""

    turns: list[TurnResult] = field(default_factory=list)
    reopens: list[Reopen] = field(default_factory=list)
    #: Why the conversation ended before its last turn ("": it did not).
    ended: str = ""


class StreamEnded(Exception):
    """The server ended a session stream (ASR or TTS) in the middle of a turn."""


class _Streams:
    """One caller's session streams: an ASR call and a TTS call, opened and configured."""

    def __init__(self, asr: grpc.aio.StreamStreamCall, tts: grpc.aio.StreamStreamCall) -> None:
        self.asr = asr
        self.tts = tts

    @property
    def broken(self) -> bool:
        """Whether either call has ended (its replica died, drained or refused it)."""
        return self.asr.done() or self.tts.done()

    def cancel(self) -> None:
        self.asr.cancel()
        self.tts.cancel()


class Caller:
    """One conversation: one ASR stream and one TTS stream for all turns, one LLM call per turn.

    The targets may each name several replicas. When a stream breaks (its replica died, or
    drained and cut it), the caller records the turn in flight as lost, opens its streams again
    (the channel's balancer picks a healthy replica) and goes on with the next turn, as the
    voice bots' adapters do; only a status no retry can mend (a bad request) ends it early.
    """

    def __init__(self, targets: Targets, question_pcm: bytes, plan: CallPlan):
        self.question_s = len(question_pcm) / 32000 / plan.speed
        self.targets = targets
        self.plan = plan
        self.frames = [
            question_pcm[i : i + 16 * FRAME_MS * 2]
            for i in range(0, len(question_pcm), 16 * FRAME_MS * 2)
        ]
        self.history: list[llm_pb2.ChatMessage] = [
            llm_pb2.ChatMessage(role="system", content=SYSTEM_PROMPT)
        ]

    async def converse(
        self, turns: int, caller_id: int, start_after_s: float = 0.0
    ) -> CallerResult:
        """Run `turns` turns; a turn lost to a broken stream is recorded, and the next one runs."""
        await asyncio.sleep(start_after_s)
        result = CallerResult()
        channels = [
            open_channel(t, self.plan.security)
            for t in (self.targets.asr, self.targets.tts, self.targets.llm)
        ]
        llm = llm_pb2_grpc.LlmServiceStub(channels[2])
        streams: _Streams | None = None
        broke_at, lost_turn = 0.0, False
        try:
            for turn in range(turns):
                if streams is not None and streams.broken:  # broke between turns: nothing lost
                    streams.cancel()
                    streams, broke_at, lost_turn = None, time.perf_counter(), False
                if streams is None:
                    streams = await self._open(channels[0], channels[1], result)
                    if streams is None:
                        break
                    if broke_at:
                        result.reopens.append(Reopen(broke_at, time.perf_counter(), lost_turn))
                try:
                    async with asyncio.timeout(self.plan.deadline_s):
                        timing = await self._turn(
                            streams.asr, streams.tts, llm, f"c{caller_id}-t{turn}"
                        )
                    result.turns.append(timing)
                    # A person hears the reply out before speaking again: after the deadline,
                    # which bounds the servers' work, not the length of the reply.
                    await self._listen(timing)
                # A write on a call that already ended raises InvalidStateError.
                except (
                    grpc.aio.AioRpcError,
                    StreamEnded,
                    asyncio.InvalidStateError,
                    TimeoutError,
                ) as err:
                    code = _code(err)
                    failed = TurnResult(error=code, detail=_detail(err))
                    failed.failed_at = time.perf_counter()
                    result.turns.append(failed)
                    if not _retryable(err):
                        result.ended = code
                        break
                    # The turn is lost; its streams may still be fine (an LLM replica died),
                    # but which one broke is not worth guessing: open both again.
                    streams.cancel()
                    streams, broke_at, lost_turn = None, time.perf_counter(), True
        finally:
            if streams is not None:
                streams.cancel()
            for channel in channels:
                await channel.close()
        return result

    async def _listen(self, timing: TurnResult) -> None:
        if not self.plan.listen:
            return
        heard_ms = timing.turn_ms + timing.reply_audio_ms / self.plan.speed
        played = timing.finalized_at + heard_ms / 1000
        await asyncio.sleep(max(0.0, played - time.perf_counter()))

    async def _open(
        self, asr_channel: grpc.aio.Channel, tts_channel: grpc.aio.Channel, result: CallerResult
    ) -> _Streams | None:
        """Open and configure both session streams, trying again with backoff while retryable.

        Returns None (and records why in `result.ended`) when it cannot within the deadline.
        """
        backoff = Backoff(first_s=0.05, ceiling_s=1.0)
        try:
            async with asyncio.timeout(self.plan.deadline_s):
                while True:
                    asr = asr_pb2_grpc.AsrServiceStub(asr_channel).StreamingRecognize()
                    tts = tts_pb2_grpc.TtsServiceStub(tts_channel).Synthesize()
                    try:
                        await asr.write(
                            asr_pb2.StreamingRecognizeRequest(
                                config=asr_pb2.RecognitionConfig(
                                    sample_rate_hz=16000,
                                    interim_results=self.plan.interim_results,
                                )
                            )
                        )
                        if await asr.read() is grpc.aio.EOF:  # the ready message
                            raise StreamEnded("the ASR server ended the stream at its start")
                        await tts.write(
                            tts_pb2.SynthesizeRequest(
                                config=tts_pb2.SynthesisConfig(sample_rate_hz=16000)
                            )
                        )
                        return _Streams(asr, tts)
                    except (grpc.aio.AioRpcError, StreamEnded, asyncio.InvalidStateError) as err:
                        asr.cancel()
                        tts.cancel()
                        if not _retryable(err):
                            result.ended = _code(err)
                            return None
                    await asyncio.sleep(backoff.next_delay())
        except TimeoutError:
            result.ended = "DEADLINE_EXCEEDED"
            return None

    async def _turn(
        self,
        asr: grpc.aio.StreamStreamCall,
        tts: grpc.aio.StreamStreamCall,
        llm: llm_pb2_grpc.LlmServiceStub,
        turn_id: str,
    ) -> TurnResult:
        timing = TurnResult()
        interval = FRAME_MS / 1000 / self.plan.speed
        started = time.perf_counter()
        for index, frame in enumerate(self.frames):
            await asr.write(asr_pb2.StreamingRecognizeRequest(audio=frame))
            # Pace by the clock, not by sleeping a fixed time per frame, so drift cannot pile up.
            delay = started + (index + 1) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        finalized = time.perf_counter()
        await asr.write(
            asr_pb2.StreamingRecognizeRequest(finalize=asr_pb2.Finalize(utterance_id=turn_id))
        )
        transcript = await _final_transcript(asr, turn_id)
        timing.asr_ttfb_ms = _ms_since(finalized)
        self.history.append(llm_pb2.ChatMessage(role="user", content=transcript or "Hello?"))
        reply = await self._reply(llm, tts, turn_id, finalized, timing)
        self.history.append(llm_pb2.ChatMessage(role="assistant", content=reply or "Okay."))
        timing.finalized_at = finalized
        return timing

    async def _reply(
        self,
        llm: llm_pb2_grpc.LlmServiceStub,
        tts: grpc.aio.StreamStreamCall,
        turn_id: str,
        finalized: float,
        timing: TurnResult,
    ) -> str:
        call = llm.GenerateChunks()
        try:
            return await self._chunks(call, tts, turn_id, finalized, timing)
        finally:
            call.cancel()  # no-op after its end; frees the replica's sequence after a failure

    async def _chunks(
        self,
        call: grpc.aio.StreamStreamCall,
        tts: grpc.aio.StreamStreamCall,
        turn_id: str,
        finalized: float,
        timing: TurnResult,
    ) -> str:
        started = time.perf_counter()
        await call.write(
            llm_pb2.GenerateChunksRequest(
                start=llm_pb2.StartGeneration(
                    request_id=turn_id,
                    conversation_id=turn_id.rsplit("-", 1)[0],
                    messages=self.history,
                    chunking=llm_pb2.ChunkingPolicy(wait_for_continue=True),
                )
            )
        )
        reply = []
        first_text_at: float | None = None
        while (response := await call.read()) is not grpc.aio.EOF:
            if response.HasField("done"):
                break
            chunk = response.chunk
            if chunk.index == 0:
                timing.llm_ttfb_ms = _ms_since(started)
            reply.append(chunk.text)
            sent = time.perf_counter()
            first_text_at = first_text_at or sent
            await tts.write(
                tts_pb2.SynthesizeRequest(
                    text=tts_pb2.TextSegment(
                        segment_id=f"{turn_id}-{chunk.index}",
                        text=chunk.text,
                        mode=tts_pb2.SYNTHESIS_MODE_STREAM
                        if chunk.index == 0
                        else tts_pb2.SYNTHESIS_MODE_BATCH,
                    )
                )
            )
            timing.reply_audio_ms += await self._speak(
                tts, chunk.index == 0, sent, finalized, timing
            )
            await call.write(
                llm_pb2.GenerateChunksRequest(
                    continue_generation=llm_pb2.ContinueGeneration(chunk_index=chunk.index)
                )
            )
        await call.done_writing()
        if first_text_at is not None:
            timing.synthesis_ms = _ms_since(first_text_at)
        return "".join(reply)

    @staticmethod
    async def _speak(
        tts: grpc.aio.StreamStreamCall,
        first: bool,
        sent: float,
        finalized: float,
        timing: TurnResult,
    ) -> float:
        """Read one segment's responses; returns its audio length in ms."""
        seen_audio = False
        while (response := await tts.read()) is not grpc.aio.EOF:
            kind = response.WhichOneof("response")
            if kind == "audio" and not seen_audio:
                seen_audio = True
                if first:
                    timing.tts_ttfb_ms = _ms_since(sent)
                    timing.turn_ms = _ms_since(finalized)
            elif kind == "segment_complete":
                return float(response.segment_complete.audio_ms)
        raise StreamEnded("the TTS stream ended in the middle of a segment")


async def _final_transcript(asr: grpc.aio.StreamStreamCall, utterance_id: str) -> str:
    while (response := await asr.read()) is not grpc.aio.EOF:
        transcript = response.transcript
        if transcript.is_final and transcript.utterance_id == utterance_id:
            return str(transcript.text)
    raise StreamEnded("the ASR stream ended before the final transcript")


def _code(error: BaseException) -> str:
    """The status name of a failed turn."""
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    if isinstance(error, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "STREAM_ENDED"


def _detail(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.details() or "")
    return str(error) or type(error).__name__


def _retryable(error: BaseException) -> bool:
    """A replica that died, drained, was full or stalled: another turn may well work."""
    return isinstance(error, StreamEnded | asyncio.InvalidStateError) or is_retryable(error)


def _ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)

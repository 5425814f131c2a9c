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

from clients.targets import Targets
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, llm_pb2, llm_pb2_grpc, tts_pb2, tts_pb2_grpc

FRAME_MS = 20
SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short sentences."


@dataclass(frozen=True)
class CallPlan:
    """How every simulated caller behaves."""

    speed: float = 1.0  # audio streaming speed; 1 is real time
    deadline_s: float = 60.0  # a turn that takes longer fails with DEADLINE_EXCEEDED
    interim_results: bool = True  # ask the ASR for interims, as the voice bots do
    listen: bool = True  # hear the reply out (at `speed`) before asking the next question
    # Callers call in one after another over the question's length, as people do, rather than
    # all finalizing in the same 20 ms (which measures a thundering herd, not a load).
    stagger: bool = True


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


@dataclass
class CallerResult:
    """All turns of one caller."""

    turns: list[TurnResult] = field(default_factory=list)


class Caller:
    """One conversation: one ASR stream and one TTS stream for all turns, one LLM call per turn."""

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
        """Run `turns` turns; a failed turn is recorded and ends the conversation."""
        await asyncio.sleep(start_after_s)
        result = CallerResult()
        channels = [
            grpc.aio.insecure_channel(t)
            for t in (self.targets.asr, self.targets.tts, self.targets.llm)
        ]
        asr = asr_pb2_grpc.AsrServiceStub(channels[0]).StreamingRecognize()
        tts = tts_pb2_grpc.TtsServiceStub(channels[1]).Synthesize()
        llm = llm_pb2_grpc.LlmServiceStub(channels[2])
        try:
            await asr.write(
                asr_pb2.StreamingRecognizeRequest(
                    config=asr_pb2.RecognitionConfig(
                        sample_rate_hz=16000, interim_results=self.plan.interim_results
                    )
                )
            )
            await asr.read()  # ready
            await tts.write(
                tts_pb2.SynthesizeRequest(config=tts_pb2.SynthesisConfig(sample_rate_hz=16000))
            )
            for turn in range(turns):
                try:
                    async with asyncio.timeout(self.plan.deadline_s):
                        result.turns.append(
                            await self._turn(asr, tts, llm, f"c{caller_id}-t{turn}")
                        )
                except grpc.aio.AioRpcError as err:
                    result.turns.append(TurnResult(error=err.code().name))
                    break
                except TimeoutError:
                    result.turns.append(TurnResult(error="DEADLINE_EXCEEDED"))
                    break
        except grpc.aio.AioRpcError as err:
            result.turns.append(TurnResult(error=err.code().name))
        finally:
            asr.cancel()
            tts.cancel()
            for channel in channels:
                await channel.close()
        return result

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
        if self.plan.listen:  # a person hears the reply out before speaking again
            played = finalized + (timing.turn_ms + timing.reply_audio_ms / self.plan.speed) / 1000
            await asyncio.sleep(max(0.0, played - time.perf_counter()))
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
        raise RuntimeError("the TTS stream ended in the middle of a segment")


async def _final_transcript(asr: grpc.aio.StreamStreamCall, utterance_id: str) -> str:
    while (response := await asr.read()) is not grpc.aio.EOF:
        transcript = response.transcript
        if transcript.is_final and transcript.utterance_id == utterance_id:
            return str(transcript.text)
    raise RuntimeError("the ASR stream ended before the final transcript")


def _ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)

"""The conversation benchmark's scenarios, each run through a real bot on the loopback transport.

- barge-in: a question that yields a long reply, interrupted at a known moment by a real
  utterance; latency from the user's speech start to the bot's audio stopping, and whether the
  assistant message in the bot's context is what was played (the played audio transcribed by the
  ASR server and aligned to the generated reply);
- backchannels: "mm-hm", "yeah"... said while the bot speaks, which should not stop it;
- echo: the bot talking, its played audio fed back into the microphone at an echo level, no user
  speech: every interruption that reaches the speaker is a false barge-in;
- pauses: user turns with a 0.6-0.9 s pause mid-sentence: a reply that starts before the user's
  speech ended is a premature turn end; turn-end latency is user speech end -> first bot audio.

Each repetition runs a fresh pipeline (`bots.pipeline.build_worker`), so contexts never mix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from pipecat.frames.frames import (
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMRunFrame,
    UserStartedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.workers.runner import WorkerRunner

from bots.frames import LLMChunkFrame
from bots.pipeline import BotConfig, build_worker, turns_of
from bots.tracing import content_on
from clients.channel import open_channel
from clients.security import ClientSecurity
from loadtest.conversation_quality_metrics import (
    MISSED_AFTER_S,
    WORD_TOLERANCE,
    Backchannel,
    BargeIn,
    EchoRun,
    Measurements,
    TurnEnd,
    played_prefix,
    words,
    written_words,
)
from loadtest.conversation_quality_scripts import (
    BACKCHANNELS,
    INTERRUPTIONS,
    STORY_QUESTIONS,
    STORYTELLER_PROMPT,
    backchannel,
    paused_turn,
    say,
)
from loadtest.conversation_quality_transport import LoopbackTransport, PlayedChunk, Spoken
from loadtest.testset import word_errors
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc
from services.runtime.audio import float_to_pcm16, pcm16_to_float, resample

T = TypeVar("T")

#: Longest wait for the bot's first audio after a user turn.
REPLY_DEADLINE_S = 60.0
#: A silence this long in the bot's audio is the bot stopping (or pausing), not a breath.
STOP_GAP_S = 0.25
#: A barge-in the bot has not yielded to (interrupted its reply) this long after the user
#: started is missed, even if its audio paused.
YIELD_S = 5.0
#: A reply that has played nothing for this long failed (the LLM or TTS missed its deadline).
STALL_S = 20.0
#: A reply still counts as playing across a gap this long (the TTS falling behind on a busy host).
SPEAKING_SLACK_S = 0.5
#: A reply is over when no audio has played this long and the LLM has finished it.
IDLE_S = 1.0


@dataclass(frozen=True)
class Plan:
    """What to run and how much of it."""

    config: BotConfig  # the bot under test, as configured (long replies for barge-ins)
    short_config: BotConfig  # the same bot with its own prompt, for the paused turns
    repetitions: int = 5
    backchannels_per_reply: int = 3
    echo_levels: tuple[float | None, ...] = (-20.0, -10.0, None)
    echo_s: float = 600.0
    echo_delay_s: float = 0.06
    talk_echo_db: float | None = None  # echo during the other scenarios (None: a headset)
    security: ClientSecurity | None = None
    log: Callable[[str], None] = print


@dataclass(eq=False)  # observers are kept in sets: hashed by identity
class Watch(BaseObserver):
    """The frames the measurements need, each noted once, when it was first pushed."""

    llm_starts: list[float] = field(default_factory=list)
    llm_ends: list[float] = field(default_factory=list)
    chunks: list[tuple[float, str]] = field(default_factory=list)
    user_starts: list[float] = field(default_factory=list)
    _seen: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        super().__init__()

    async def on_push_frame(self, data: FramePushed) -> None:
        """Note the first push of each frame of interest."""
        frame: Frame = data.frame
        kinds = (
            LLMFullResponseStartFrame,
            LLMFullResponseEndFrame,
            LLMChunkFrame,
            UserStartedSpeakingFrame,
        )
        if not isinstance(frame, kinds) or frame.id in self._seen:
            return
        self._seen.add(frame.id)
        now = time.perf_counter()
        if isinstance(frame, LLMFullResponseStartFrame):
            self.llm_starts.append(now)
        elif isinstance(frame, LLMFullResponseEndFrame):
            self.llm_ends.append(now)
        elif isinstance(frame, LLMChunkFrame):
            self.chunks.append((now, frame.text))
        else:
            self.user_starts.append(now)


class BotSession:
    """One bot pipeline on a loopback transport, run in the background."""

    def __init__(self, config: BotConfig, echo_db: float | None, delay_s: float, keep: bool):
        self.transport = LoopbackTransport(echo_db, delay_s, keep_audio=keep)
        self.worker, self.services = build_worker(config, self.transport)
        self.watch = Watch()
        self.worker.add_observer(self.watch)
        self._runner = WorkerRunner(handle_sigint=False)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BotSession:
        await self._runner.add_workers(self.worker)
        self._task = asyncio.create_task(self._runner.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.worker.cancel()
        assert self._task is not None
        await asyncio.wait_for(self._task, 30)

    async def until(self, probe: Callable[[], T | None], timeout_s: float) -> T | None:
        """Poll `probe` every 20 ms until it returns something; None after `timeout_s`."""
        deadline = time.perf_counter() + timeout_s
        while (value := probe()) is None:
            if self._task is not None and self._task.done():
                raise RuntimeError("the bot's pipeline ended early")
            if time.perf_counter() > deadline:
                return None
            await asyncio.sleep(0.02)
        return value

    async def say(self, text: str) -> Spoken:
        """The user says `text` (in the user's voice)."""
        return await self.transport.input().say(say(text))

    async def heard(self, spoken: Spoken) -> Spoken:
        """Wait until `spoken` has been played into the microphone."""
        await asyncio.wait_for(spoken.done.wait(), 60)
        return spoken

    def first_audio_after(self, moment: float) -> PlayedChunk | None:
        """The bot's first audio after `moment`."""
        return self.transport.output().first_after(moment)

    def idle(self, since: float) -> bool:
        """Whether a reply asked at `since` is over and the speaker has been quiet.

        Over: the LLM ended it, or nothing has played for `STALL_S` (a request that failed,
        which ends no reply).
        """
        output, now = self.transport.output(), time.perf_counter()
        last_end = output.chunks[-1].end if output.chunks else 0.0
        replied = any(t > since for t in self.watch.llm_ends)
        stalled = now - max(since, last_end) > STALL_S
        return (replied or stalled) and now - last_end > IDLE_S


async def question_turn(session: BotSession, text: str, m: Measurements) -> PlayedChunk | None:
    """The user asks `text`; records the turn end; returns the reply's first audio."""
    spoken = await session.heard(await session.say(text))
    first = await session.until(
        lambda: session.first_audio_after(spoken.speech_end), REPLY_DEADLINE_S
    )
    premature = any(spoken.speech_start < t < spoken.speech_end for t in session.watch.llm_starts)
    latency = None if first is None else 1000 * (first.start - spoken.speech_end)
    m.turns.append(TurnEnd("question", 0.0, latency, premature))
    return first


async def barge_ins(plan: Plan, asr_target: str, m: Measurements) -> None:
    """Interrupt long replies at known moments; measure latency and context accuracy."""
    for rep in range(plan.repetitions):
        try:
            async with BotSession(plan.config, plan.talk_echo_db, plan.echo_delay_s, True) as s:
                await _barge_in(s, rep, plan, asr_target, m)
        except RuntimeError as err:
            m.failures.append(f"barge-in {rep + 1}: {err}")
            plan.log(f"barge-in {rep + 1}: {err}")


async def _barge_in(s: BotSession, rep: int, plan: Plan, asr_target: str, m: Measurements) -> None:
    first = await question_turn(s, STORY_QUESTIONS[rep % len(STORY_QUESTIONS)], m)
    if first is None:
        plan.log(f"barge-in {rep + 1}: no reply")
        m.not_interruptible += 1
        return
    at_s = 1.5 + 0.7 * (rep % 5)  # how far into the reply the user starts speaking
    interruption = say(INTERRUPTIONS[rep % len(INTERRUPTIONS)])
    await asyncio.sleep(max(0.0, first.start + at_s - interruption.onset_s - time.perf_counter()))
    output = s.transport.output()
    if not output.playing_at(time.perf_counter(), SPEAKING_SLACK_S):
        plan.log(f"barge-in {rep + 1}: the reply ended before {at_s:.1f} s")
        m.not_interruptible += 1
        return
    spoken = await s.transport.input().say(interruption)
    await s.until(lambda: spoken.started_at if spoken.started_at > 0 else None, 30)
    start = spoken.speech_start
    cut = await s.until(
        lambda: next((t for t in output.interruptions if t > start), None),
        max(0.0, start + YIELD_S - time.perf_counter()),
    )
    await asyncio.sleep(STOP_GAP_S)  # the silence that shows the audio stopped
    stopped = output.stopped_after(start, STOP_GAP_S)
    latency = (
        None
        if cut is None or stopped - start > MISSED_AFTER_S
        else 1000 * max(0.0, stopped - start)
    )
    await s.heard(spoken)
    result = await _context_check(s, first.start, cut or start, asr_target, plan)
    if cut is None:  # the bot went on: no interrupted reply whose context to judge
        result = dataclasses.replace(result, accurate=None, yielded=False)
    m.barge_ins.append(dataclasses.replace(result, at_s=at_s, latency_ms=latency))
    plan.log(
        f"barge-in {rep + 1}: at {at_s:.1f} s, "
        + ("missed" if latency is None else f"{latency:.0f} ms")
        + f"; stored {result.stored_words} words, played {result.played_words_asr}"
        + f" of {result.generated_words} generated"
    )


async def _context_check(
    s: BotSession, reply_start: float, cut: float, asr_target: str, plan: Plan
) -> BargeIn:
    """Compare the interrupted reply stored in the context with what was played."""
    await s.until(lambda: True if turns_of(s.services.context, "assistant") else None, 10)
    await asyncio.sleep(0.5)  # the aggregator may still be adding the cut reply
    stored = next(iter(turns_of(s.services.context, "assistant")), "")
    generated = written_words(" ".join(text for at, text in s.watch.chunks if at < cut))
    output = s.transport.output()
    played = output.audio_between(reply_start, cut)
    heard = await transcribe(asr_target, played, output.sample_rate, plan.security)
    played_words = played_prefix(generated, words(heard))
    stored_words = written_words(stored)
    if content_on():
        plan.log(f"  stored: {stored!r}\n  heard:  {heard!r}")
    matches, _ = word_errors(" ".join(stored_words), " ".join(generated[: len(stored_words)]))
    accurate = (
        abs(len(stored_words) - played_words) <= WORD_TOLERANCE and matches <= WORD_TOLERANCE
        if generated
        else None
    )
    return BargeIn(
        at_s=0.0,
        latency_ms=None,
        generated_words=len(generated),
        stored_words=len(stored_words),
        played_words_asr=played_words,
        played_s=round(output.played_s(reply_start, cut), 2),
        accurate=accurate,
    )


async def transcribe(target: str, pcm: bytes, rate: int, security: ClientSecurity | None) -> str:
    """The ASR server's final transcript of `pcm` (sent as fast as it takes it)."""
    if not pcm:
        return ""
    audio = float_to_pcm16(resample(pcm16_to_float(pcm), rate, 16000))
    audio += bytes(16000)  # half a second of silence: the last word's right context

    async def requests() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
        yield asr_pb2.StreamingRecognizeRequest(
            config=asr_pb2.RecognitionConfig(sample_rate_hz=16000)
        )
        for offset in range(0, len(audio), 16000):
            yield asr_pb2.StreamingRecognizeRequest(audio=audio[offset : offset + 16000])
        yield asr_pb2.StreamingRecognizeRequest(finalize=asr_pb2.Finalize(utterance_id="played"))

    async with open_channel(target, security) as channel:
        call = asr_pb2_grpc.AsrServiceStub(channel).StreamingRecognize(requests(), timeout=60)
        async for response in call:
            if response.WhichOneof("response") == "transcript" and response.transcript.is_final:
                call.cancel()
                return str(response.transcript.text)
    return ""


async def backchannels(plan: Plan, m: Measurements) -> None:
    """Backchannels while the bot speaks; count those after which it stopped."""
    for rep in range(plan.repetitions):
        try:
            async with BotSession(plan.config, plan.talk_echo_db, plan.echo_delay_s, False) as s:
                question = STORY_QUESTIONS[(rep + 3) % len(STORY_QUESTIONS)]
                first = await question_turn(s, question, m)
                if first is None:
                    continue
                output = s.transport.output()
                for k in range(plan.backchannels_per_reply):
                    word = BACKCHANNELS[(rep + k) % len(BACKCHANNELS)]
                    speech = backchannel(word)
                    at = first.start + 2.0 + 2.5 * k - speech.onset_s
                    await asyncio.sleep(max(0.0, at - time.perf_counter()))
                    if not output.playing_at(time.perf_counter(), SPEAKING_SLACK_S):
                        break
                    spoken = await s.heard(await s.transport.input().say(speech))
                    start = spoken.speech_start
                    await asyncio.sleep(max(0.0, start + MISSED_AFTER_S - time.perf_counter()))
                    stopped = any(start < t < start + MISSED_AFTER_S for t in output.interruptions)
                    paused = not stopped and bool(
                        output.gaps(start, start + MISSED_AFTER_S, STOP_GAP_S)
                    )
                    m.backchannels.append(Backchannel(word, stopped, paused))
                    verdict = "stopped the bot" if stopped else "paused it" if paused else "ignored"
                    plan.log(f"backchannel {word!r}: {verdict}")
        except RuntimeError as err:
            m.failures.append(f"backchannels {rep + 1}: {err}")
            plan.log(f"backchannels {rep + 1}: {err}")


async def echo_run(plan: Plan, echo_db: float | None, m: Measurements) -> None:
    """The bot tells stories with its own voice leaking back; no user speech at all.

    A pipeline that ends early (Pipecat's idle timeout after the bot stalled) is counted as a
    stall, and a fresh one takes over until the bot has spoken `plan.echo_s` in all.
    """
    run = EchoRun(echo_db)
    m.echo.append(run)
    deadline = time.perf_counter() + 4 * plan.echo_s + 120
    while run.bot_speech_s < plan.echo_s and time.perf_counter() < deadline:
        try:
            async with BotSession(plan.config, echo_db, plan.echo_delay_s, False) as s:
                try:
                    await _echo_session(s, plan, run, deadline)
                finally:
                    _count_echo(s, run)
        except RuntimeError as err:
            run.stalls += 1
            m.failures.append(f"echo {echo_db}: {err}")
            plan.log(f"echo: {err}; a fresh pipeline goes on")
    label = "none" if echo_db is None else f"{echo_db:g} dB"
    plan.log(
        f"echo {label}: {run.false_barge_ins} false barge-ins in {run.bot_speech_s:.0f} s "
        f"of bot speech ({run.replies} replies, {run.stalls} stalls)"
    )


async def _echo_session(s: BotSession, plan: Plan, run: EchoRun, deadline: float) -> None:
    output = s.transport.output()
    system: Any = {"role": "system", "content": plan.config.system_prompt}
    enough_s = plan.echo_s - run.bot_speech_s
    while output.played_s() < enough_s and time.perf_counter() < deadline:
        question = STORY_QUESTIONS[run.replies % len(STORY_QUESTIONS)]
        ask: Any = {"role": "user", "content": question}
        s.services.context.set_messages([system, ask])
        asked = time.perf_counter()
        await s.worker.queue_frames([LLMRunFrame()])
        run.replies += 1
        await s.until(
            partial(_reply_over, s, asked, enough_s),
            min(300.0, max(1.0, deadline - time.perf_counter())),
        )


def _count_echo(s: BotSession, run: EchoRun) -> None:
    """Add what one pipeline of an echo run played and did to `run`."""
    output, now = s.transport.output(), time.perf_counter()
    run.bot_speech_s = round(run.bot_speech_s + output.played_s(), 1)
    run.false_barge_ins += len(output.interruptions)
    short = set(output.gaps(0.0, now, STOP_GAP_S)) - set(output.gaps(0.0, now, IDLE_S))
    run.audio_gaps += len(short)
    run.user_turns += len(s.watch.user_starts)


def _reply_over(s: BotSession, asked: float, enough_s: float) -> bool | None:
    """True once the reply asked at `asked` is over, or the bot has spoken `enough_s`."""
    return True if s.idle(asked) or s.transport.output().played_s() >= enough_s else None


async def paused_turns(plan: Plan, m: Measurements) -> None:
    """Turns with a pause mid-sentence: premature turn ends and turn-end latency."""
    for rep in range(plan.repetitions):
        head, tail, pause = paused_turn(rep)
        try:
            session = BotSession(plan.short_config, plan.talk_echo_db, plan.echo_delay_s, False)
            async with session as s:
                first_half = await s.transport.input().say(head)
                second_half = await s.heard(await s.transport.input().say(tail))
                end = second_half.speech_end
                reply = await s.until(partial(s.first_audio_after, end), REPLY_DEADLINE_S)
                begun = first_half.speech_start
                premature = any(begun < t < end for t in s.watch.llm_starts) or any(
                    begun < c.start < end for c in s.transport.output().chunks
                )
                latency = None if reply is None else 1000 * (reply.start - end)
                m.turns.append(TurnEnd("paused", pause, latency, premature))
                plan.log(
                    f"paused turn {rep + 1} ({pause:.2f} s pause): "
                    + ("premature, " if premature else "")
                    + ("no reply" if latency is None else f"reply after {latency:.0f} ms")
                )
        except RuntimeError as err:
            m.failures.append(f"paused turn {rep + 1}: {err}")
            plan.log(f"paused turn {rep + 1}: {err}")


def storyteller(config: BotConfig, max_tokens: int) -> BotConfig:
    """`config` asked for long replies, without tools (they add nothing to turn-taking)."""
    return dataclasses.replace(
        config, system_prompt=STORYTELLER_PROMPT, max_tokens=max_tokens, tools=False
    )

"""A real Pipecat pipeline over the three real servers (CPU backends), fed from WAV speech."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.workers.runner import WorkerRunner

from bots.frames import LLMChunkFrame, SegmentCompleteFrame
from bots.pipeline import BotConfig, build_worker, turns_of
from bots.turn_settings import TurnSettings
from bots.wav_transport import WavFileTransport
from clients.targets import Targets
from tests.mesh import real_mesh
from tests.speech import speech_pcm, wer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
]

QUESTION = "What is the capital city of France?"
STORY = "Please tell me a long story about a friendly dragon who lives in the mountains."
FOLLOW_UP = "How many legs does a spider have?"


@dataclass
class Seen:
    """One frame as it left a processor."""

    at: float
    source: str
    frame: Frame


class FrameLog(BaseObserver):
    """Every frame pushed in the pipeline, in order, with where it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        self.seen.append(Seen(time.perf_counter(), data.source.name, data.frame))

    def first(self, kind: type, source: str | None = None, after: float = 0.0) -> Seen | None:
        return next(
            (
                s
                for s in self.seen
                if isinstance(s.frame, kind)
                and s.at > after
                and (source is None or s.source.startswith(source))
            ),
            None,
        )

    def all(self, kind: type, source: str | None = None) -> list[Seen]:
        return [
            s
            for s in self.seen
            if isinstance(s.frame, kind) and (source is None or s.source.startswith(source))
        ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh() -> AsyncIterator[Targets]:
    async with real_mesh() as targets:
        yield targets


class Conversation:
    """A bot on a WAV transport, run in the background until `close`."""

    def __init__(self, targets: Targets, config: BotConfig, speech: bytes) -> None:
        config.targets = targets
        self.transport = WavFileTransport(speech)
        self.worker, self.services = build_worker(config, self.transport)
        self.log = FrameLog()
        self.worker.add_observer(self.log)
        self.runner = WorkerRunner(handle_sigint=False)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Conversation:
        await self.runner.add_workers(self.worker)
        self.task = asyncio.create_task(self.runner.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.worker.cancel()
        assert self.task is not None
        await asyncio.wait_for(self.task, 20)

    async def until(self, condition, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.task is not None and not self.task.done(), "the pipeline ended early"
            assert time.monotonic() < deadline, "timed out; frames: " + ", ".join(
                type(s.frame).__name__ for s in self.log.seen[-40:]
            )
            await asyncio.sleep(0.05)

    def replies(self) -> list[str]:
        return turns_of(self.services.context, "assistant")

    def user_turns(self) -> list[str]:
        return turns_of(self.services.context, "user")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bot", ["interleaved_streaming", "simple_vad"])
async def test_a_spoken_question_gets_a_spoken_answer(mesh, bot):
    config = BotConfig(
        name=bot,
        turn=TurnSettings(
            vad_stop_s=0.2 if bot != "simple_vad" else 0.8, smart_turn=bot != "simple_vad"
        ),
        max_tokens=48,
    )
    async with Conversation(mesh, config, speech_pcm(QUESTION)) as talk:
        await talk.until(lambda: talk.log.first(BotStoppedSpeakingFrame) is not None, 90)
        await talk.until(lambda: talk.replies(), 10)

    log = talk.log
    # The transcript that reached the LLM is the question, finalized before the turn ended.
    assert wer(QUESTION, talk.user_turns()[0]) <= 0.25, talk.user_turns()
    final = log.first(TranscriptionFrame, source="GrpcSTTService")
    stopped = log.first(UserStoppedSpeakingFrame, source="GrpcSTTService")
    assert final is not None and final.frame.finalized
    assert stopped is not None and final.at <= stopped.at
    # Then: the reply's chunks, its audio, the bot speaking; in that order.
    start = log.first(LLMFullResponseStartFrame, source="GrpcChunkedLLMService")
    chunk = log.first(LLMChunkFrame, source="GrpcChunkedLLMService")
    audio = log.first(TTSAudioRawFrame, source="GrpcTTSService")
    speaking = log.first(BotStartedSpeakingFrame)
    end = log.first(LLMFullResponseEndFrame, source="GrpcTTSService")
    assert start and chunk and audio and speaking and end
    assert stopped.at <= start.at < chunk.at < audio.at <= speaking.at
    # The reply's end leaves the TTS only after all of its audio.
    assert all(s.at < end.at for s in log.all(TTSAudioRawFrame, source="GrpcTTSService"))
    # Every chunk was spoken as the segment of its id, and each completion went back upstream.
    chunks = [s.frame for s in log.all(LLMChunkFrame, source="GrpcChunkedLLMService")]
    completes = {s.frame.segment_id for s in log.all(SegmentCompleteFrame)}
    assert {c.segment_id for c in chunks} == completes
    # The text the context recorded for the bot is the text of the chunks, in order.
    assert talk.replies()[0].split() == "".join(c.text for c in chunks).split()
    played = talk.transport.output().played
    assert len(played.pcm) / 2 / played.sample_rate > 0.5
    assert talk.services.stt.session_id


@pytest.mark.timeout(150)
async def test_user_speech_interrupts_the_bot_and_the_next_turn_works(mesh):
    config = BotConfig(
        name="interleaved_streaming",
        turn=TurnSettings(vad_stop_s=0.2, smart_turn=True),
        max_tokens=200,
    )
    async with Conversation(mesh, config, speech_pcm(STORY)) as talk:
        await talk.until(lambda: talk.log.first(BotStartedSpeakingFrame) is not None, 90)
        await asyncio.sleep(1.0)  # the user hears a second of the story, then speaks over it
        await talk.transport.input().say(speech_pcm(FOLLOW_UP))
        said_at = time.perf_counter()

        def interruption() -> Seen | None:
            return talk.log.first(InterruptionFrame, source="GrpcTTSService", after=said_at)

        await talk.until(interruption, 20)
        interrupted = interruption()
        assert interrupted is not None
        first_reply = {
            s.frame.segment_id for s in talk.log.all(LLMChunkFrame, source="GrpcChunkedLLMService")
        }
        await talk.until(
            lambda: (
                len(talk.replies()) >= 2
                and talk.log.first(BotStoppedSpeakingFrame, after=interrupted.at) is not None
            ),
            90,
        )

    log = talk.log
    # No audio of the interrupted reply reached the transport after the interruption.
    late = [
        s
        for s in log.all(TTSAudioRawFrame, source="GrpcTTSService")
        if s.at > interrupted.at and s.frame.context_id in first_reply
    ]
    assert late == []
    # The next turn was heard and answered, with audio.
    assert wer(FOLLOW_UP, talk.user_turns()[-1]) <= 0.25, talk.user_turns()
    answer_audio = [
        s
        for s in log.all(TTSAudioRawFrame, source="GrpcTTSService")
        if s.at > interrupted.at and s.frame.context_id not in first_reply
    ]
    assert answer_audio

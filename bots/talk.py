"""`nemotron-speech talk --in question.wav --out reply.wav`: one turn through the real pipeline.

The question plays into the bot's pipeline as a microphone would (real time, then silence); the
reply's audio is written to a WAV file; the transcript, the reply text and each stage's TTFB are
printed. It talks to running servers (NVIDIA_ASR_URL, NVIDIA_TTS_URL, NVIDIA_LLM_URL), with the
TLS and token of its flags or of the NEMOTRON_TLS_* and NEMOTRON_TOKEN* variables.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import time
from pathlib import Path

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    MetricsFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.workers.runner import WorkerRunner

from bots.names import DEFAULT_BOT
from bots.pipeline import BotConfig, build_worker, turns_of
from bots.tracing import configure_bot_tracing, flush_bot_tracing
from bots.wav_transport import WavFileTransport, read_wav, write_wav
from clients.security import ClientSecurity

STAGES = {"GrpcSTTService": "asr", "GrpcChunkedLLMService": "llm", "GrpcTTSService": "tts"}


class TurnWatch(BaseObserver):
    """Collects one turn's stage TTFBs and its voice-to-voice time."""

    def __init__(self) -> None:
        super().__init__()
        self.ttfb_ms: dict[str, float] = {}
        self.user_stopped_at: float | None = None
        self.bot_started_at: float | None = None
        self.bot_stopped = asyncio.Event()

    async def on_push_frame(self, data: FramePushed) -> None:
        """Note the moments and metrics of the turn."""
        frame = data.frame
        if isinstance(frame, MetricsFrame):
            for metric in frame.data:
                stage = STAGES.get(metric.processor.split("#")[0], "")
                first = bool(stage) and stage not in self.ttfb_ms
                if isinstance(metric, TTFBMetricsData) and first and metric.value > 0:
                    self.ttfb_ms[stage] = 1000 * metric.value
        elif isinstance(frame, UserStoppedSpeakingFrame) and self.user_stopped_at is None:
            self.user_stopped_at = time.perf_counter()
        elif isinstance(frame, BotStartedSpeakingFrame) and self.bot_started_at is None:
            self.bot_started_at = time.perf_counter()
        elif isinstance(frame, BotStoppedSpeakingFrame) and self.bot_started_at is not None:
            self.bot_stopped.set()


async def talk(
    question: Path,
    reply: Path,
    bot: str = DEFAULT_BOT,
    timeout_s: float = 120.0,
    security: ClientSecurity | None = None,
) -> int:
    """Run one turn; returns the process exit code. `security`: None reads the environment."""
    configure_bot_tracing()
    config: BotConfig = importlib.import_module(f"bots.{bot}").CONFIG
    # The NEMOTRON_BOT_* variables tune the turn settings here as for a served bot.
    config = dataclasses.replace(config, security=security, turn=config.turn.with_environment())
    transport = WavFileTransport(read_wav(question, 16000))
    worker, services = build_worker(config, transport)
    watch = TurnWatch()
    worker.add_observer(watch)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(watch.bot_stopped.wait(), timeout_s)
    except TimeoutError:
        print(f"no reply within {timeout_s:g} s; are the servers up? (nemotron-speech health)")
        return 1
    finally:
        await worker.cancel()
        await running
        flush_bot_tracing()
    played = transport.output().played
    write_wav(reply, played.pcm, played.sample_rate)
    said = turns_of(services.context, "user")
    answered = turns_of(services.context, "assistant")
    print(f"transcript: {said[-1] if said else ''}")
    print(f"reply:      {answered[-1] if answered else ''}")
    for stage in ("asr", "llm", "tts"):
        if stage in watch.ttfb_ms:
            print(f"{stage} ttfb:   {watch.ttfb_ms[stage]:.0f} ms")
    if watch.user_stopped_at is not None and watch.bot_started_at is not None:
        turn_ms = 1000 * (watch.bot_started_at - watch.user_stopped_at)
        print(f"turn end -> first reply audio: {turn_ms:.0f} ms")
    print(f"wrote {len(played.pcm) / 2 / played.sample_rate:.1f} s of audio to {reply}")
    return 0

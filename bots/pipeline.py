"""The voice pipeline every bot runs, built from a `BotConfig` around any Pipecat transport.

transport in [-> echo canceller] -> Silero VAD -> turn detection -> GrpcSTTService
  [-> barge-in gate] -> user context -> GrpcChunkedLLMService -> GrpcTTSService [-> playout gate]
  [-> speaker tap, the echo reference] -> transport out [-> playout ack] -> heard words
  -> assistant context

Unless `BotConfig.tools` is off, the LLM service also runs the bot's local tools (`bots.tools`).
`BotConfig.turn` (`bots.turn_settings`) holds the endpointing, barge-in and echo settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import LLMRunFrame
from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.user_turn_processor import UserTurnProcessor

from bots.barge_in import BargeInGate
from bots.echo import EchoCanceller, EchoReference, SpeakerTap, wants_echo_cancellation
from bots.echo_floor import FloorVADAnalyzer, floor_params
from bots.heard import HeardWords
from bots.llm import GrpcChunkedLLMService
from bots.playout import PlayoutAck, PlayoutGate
from bots.rtvi import client_rtvi, observer_params
from bots.stt import GrpcSTTService
from bots.tools import BotTools
from bots.tracing import tracing_on
from bots.tts import GrpcTTSService
from bots.turn_settings import TurnSettings
from bots.turns import aggregator_turns, turn_detection
from clients.security import ClientSecurity
from clients.targets import Targets
from nemotron.speech.v1 import llm_pb2

SYSTEM_PROMPT = (
    "You are a helpful voice assistant running privately on the user's own machine. "
    "Answer in one or two short, plain sentences that sound natural when spoken."
)


@dataclass
class BotConfig:
    """What distinguishes one bot from another."""

    name: str
    turn: TurnSettings = field(default_factory=TurnSettings)
    adaptive_tts: bool = True
    system_prompt: str = SYSTEM_PROMPT
    greeting: bool = False
    voice: str = field(default_factory=lambda: os.environ.get("NEMOTRON_BOT_VOICE", ""))
    language: str = "en"
    max_tokens: int = 96
    # The LLM's sampling seed: a fixed one makes the replies repeatable (tests); None: a fresh
    # draw for each reply.
    seed: int | None = None
    # The bot's local tools (the time, spoken timers); off: the model only answers.
    tools: bool = True
    targets: Targets = field(default_factory=Targets)
    # TLS and token of the adapters' channels; None: from NEMOTRON_TLS_* and NEMOTRON_TOKEN*.
    security: ClientSecurity | None = None


@dataclass
class Services:
    """The three adapters of a pipeline, kept for tests and metrics."""

    stt: GrpcSTTService
    llm: GrpcChunkedLLMService
    tts: GrpcTTSService
    context: LLMContext
    tools: BotTools | None = None
    heard: HeardWords | None = None
    turns: UserTurnProcessor | None = None
    gate: BargeInGate | None = None
    echo: EchoCanceller | None = None
    playout: PlayoutGate | None = None


def build_services(config: BotConfig) -> Services:
    """The three gRPC adapters for `config`, with the bot's tools unless it turns them off."""
    services = Services(
        stt=GrpcSTTService(
            target=config.targets.asr,
            security=config.security,
            language=config.language,
            word_timestamps=config.turn.barge_in_gated,
        ),
        llm=GrpcChunkedLLMService(
            target=config.targets.llm,
            security=config.security,
            sampling=llm_pb2.SamplingParams(
                max_tokens=config.max_tokens, temperature=0.6, seed=config.seed
            ),
        ),
        tts=GrpcTTSService(
            target=config.targets.tts,
            security=config.security,
            voice=config.voice,
            adaptive=config.adaptive_tts,
        ),
        context=LLMContext([{"role": "system", "content": config.system_prompt}]),
    )
    if config.tools:
        services.tools = BotTools()
        services.tools.register(services.llm)
        services.context.set_tools(services.tools.schema)
    return services


def build_pipeline(
    config: BotConfig, input: FrameProcessor, output: FrameProcessor
) -> tuple[Pipeline, Services]:
    """The voice pipeline between a transport's `input` and `output` processors."""
    services = build_services(config)
    turn = config.turn
    context = LLMContextAggregatorPair(
        services.context,
        user_params=LLMUserAggregatorParams(user_turn_strategies=aggregator_turns()),
    )
    cancelling_echo = wants_echo_cancellation(turn.echo_cancellation, input)
    analyzer = vad_analyzer(turn, cancelling_echo)
    services.turns = UserTurnProcessor(
        user_turn_strategies=turn_detection(turn), user_idle_timeout=turn.user_idle_s
    )
    tts = services.tts
    services.heard = HeardWords(lambda: tts.generated_words)
    if turn.barge_in_gated:
        if turn.resume_after_false_interruption:
            services.playout = PlayoutGate()
        floor = analyzer if isinstance(analyzer, FloorVADAnalyzer) else None
        services.gate = BargeInGate(
            turn,
            recent_bot_words=services.heard.recent_words,
            playout=services.playout,
            audio_ms=services.stt.audio_ms,
            floor=floor.passed_since if floor is not None else None,
            floor_s=floor.loud_s_since if floor is not None else None,
        )
    to_speaker: list[FrameProcessor] = []
    if services.playout is not None:
        to_speaker.append(services.playout)
    if cancelling_echo:
        reference = EchoReference()
        services.echo = EchoCanceller(reference)
        to_speaker.append(SpeakerTap(reference))
    pipeline = Pipeline(
        [
            input,
            *([services.echo] if services.echo is not None else []),
            VADProcessor(vad_analyzer=analyzer),
            services.turns,
            services.stt,
            *([services.gate] if services.gate is not None else []),
            context.user(),
            services.llm,
            services.tts,
            *to_speaker,
            output,
            *([PlayoutAck(services.playout)] if services.playout is not None else []),
            services.heard,
            context.assistant(),
        ]
    )
    return pipeline, services


def vad_analyzer(turn: TurnSettings, cancelling_echo: bool) -> SileroVADAnalyzer:
    """The VAD of a bot, and where it cancels its echo, the echo floor (`bots.echo_floor`).

    With the barge-in rules the floor judges a barge-in (a `FloorVADAnalyzer` for the gate) and
    the VAD starts quickly; without them nothing else could, so it holds the VAD's start.
    """
    floored = cancelling_echo and turn.echo_vad_floor
    if floored and turn.barge_in_gated:
        return FloorVADAnalyzer(params=vad_params(turn, floored=False))
    return SileroVADAnalyzer(params=vad_params(turn, floored=floored))


def vad_params(turn: TurnSettings, floored: bool) -> VADParams:
    """Silero's parameters from the turn settings, held to the echo floor if `floored`.

    The floor holds the VAD's start only for a bot that cancels its echo without the barge-in
    rules (`bots.echo_floor`: the canceller's residual passes the quick start now and then).
    """
    params = VADParams(
        confidence=turn.vad_confidence,
        start_secs=turn.vad_start_s,
        stop_secs=turn.vad_stop_s,
        min_volume=turn.vad_min_volume,
    )
    return floor_params(params) if floored else params


def turns_of(context: LLMContext, role: str) -> list[str]:
    """The text of the context's messages of `role`, oldest first."""
    texts = []
    for message in context.get_messages():
        if isinstance(message, dict) and message.get("role") == role:
            content = message.get("content")
            if content is not None:  # None: an assistant turn that only called tools
                texts.append(content if isinstance(content, str) else str(content))
    return texts


def voice_to_voice_observer(bot: str) -> UserBotLatencyObserver:
    """Logs, per turn, the time from the user's end of speech to the bot's first audio."""
    observer = UserBotLatencyObserver()

    @observer.event_handler("on_latency_measured")
    async def _log(_observer: UserBotLatencyObserver, seconds: float) -> None:
        logger.info(f"{bot}: voice-to-voice {1000 * seconds:.0f} ms")

    return observer


def build_worker(config: BotConfig, transport: BaseTransport) -> tuple[PipelineWorker, Services]:
    """A worker that runs the pipeline on `transport`, with metrics and the latency observer.

    RTVI (`bots.rtvi`) tells a client on the transport's data channel what happens, turn by turn.
    """
    pipeline, services = build_pipeline(config, transport.input(), transport.output())
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
        observers=[voice_to_voice_observer(config.name)],
        rtvi_processor=client_rtvi(),
        rtvi_observer_params=observer_params(),
        # Pipecat's conversation and turn spans: the parents of the adapters' client spans.
        enable_tracing=tracing_on(),
        conversation_id=services.llm.conversation_id,
    )
    if services.tools is not None:
        tools = services.tools

        @worker.event_handler("on_pipeline_finished")
        async def _stop_timers(_worker: PipelineWorker, _frame: object) -> None:
            await tools.close()  # no timer speaks into a pipeline that has ended

    if config.turn.user_idle_s > 0 and services.turns is not None:
        _prompt_when_idle(worker, services.turns, services.context)

    if config.greeting:

        @transport.event_handler("on_client_connected")
        async def _greet(_transport: BaseTransport, _client: object) -> None:
            services.context.add_message({"role": "user", "content": "Say hello briefly."})
            await worker.queue_frames([LLMRunFrame()])

    return worker, services


#: What the bot is asked to do when the user stays silent for `TurnSettings.user_idle_s`.
IDLE_PROMPT = (
    "(The user has said nothing for a while. Ask briefly and kindly whether they are still "
    "there; do not repeat your last answer.)"
)


def _prompt_when_idle(
    worker: PipelineWorker, turns: UserTurnProcessor, context: LLMContext
) -> None:
    """Once the user is idle after the bot spoke, prompt them once, until they speak again.

    The prompt enters the context as a user message, as the greeting's does: the chat templates
    of the mesh's models take system messages only at the start.
    """
    prompted = False

    @turns.event_handler("on_user_turn_started")
    async def _spoke(_turns: UserTurnProcessor, _strategy: object) -> None:
        nonlocal prompted
        prompted = False

    @turns.event_handler("on_user_turn_idle")
    async def _idle(_turns: UserTurnProcessor) -> None:
        nonlocal prompted
        if prompted:
            return
        prompted = True
        logger.info("the user is idle; asking whether they are still there")
        context.add_message({"role": "user", "content": IDLE_PROMPT})
        await worker.queue_frames([LLMRunFrame()])

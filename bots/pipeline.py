"""The voice pipeline every bot runs, built from a `BotConfig` around any Pipecat transport.

transport in -> Silero VAD -> turn detection -> GrpcSTTService -> user context
  -> GrpcChunkedLLMService -> GrpcTTSService -> transport out -> assistant context

Unless `BotConfig.tools` is off, the LLM service also runs the bot's local tools (`bots.tools`).
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

from bots.llm import GrpcChunkedLLMService
from bots.rtvi import client_rtvi, observer_params
from bots.stt import GrpcSTTService
from bots.tools import BotTools
from bots.tracing import tracing_on
from bots.tts import GrpcTTSService
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
    vad_stop_s: float
    smart_turn: bool
    adaptive_tts: bool = True
    system_prompt: str = SYSTEM_PROMPT
    greeting: bool = False
    voice: str = field(default_factory=lambda: os.environ.get("NEMOTRON_BOT_VOICE", ""))
    language: str = "en"
    max_tokens: int = 96
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


def build_services(config: BotConfig) -> Services:
    """The three gRPC adapters for `config`, with the bot's tools unless it turns them off."""
    services = Services(
        stt=GrpcSTTService(
            target=config.targets.asr, security=config.security, language=config.language
        ),
        llm=GrpcChunkedLLMService(
            target=config.targets.llm,
            security=config.security,
            sampling=llm_pb2.SamplingParams(max_tokens=config.max_tokens, temperature=0.6),
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
    context = LLMContextAggregatorPair(
        services.context,
        user_params=LLMUserAggregatorParams(user_turn_strategies=aggregator_turns()),
    )
    pipeline = Pipeline(
        [
            input,
            VADProcessor(
                vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=config.vad_stop_s))
            ),
            UserTurnProcessor(user_turn_strategies=turn_detection(config.smart_turn)),
            services.stt,
            context.user(),
            services.llm,
            services.tts,
            output,
            context.assistant(),
        ]
    )
    return pipeline, services


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

    if config.greeting:

        @transport.event_handler("on_client_connected")
        async def _greet(_transport: BaseTransport, _client: object) -> None:
            services.context.add_message({"role": "user", "content": "Say hello briefly."})
            await worker.queue_frames([LLMRunFrame()])

    return worker, services

"""Test doubles of the three backend seams (deterministic, instant, observable) and of a collector.

They let contract tests drive the servicers through real gRPC without model weights. None of them
is a product backend: they live here, in tests/, and are named as doubles.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from services.asr.backend import (
    AsrBackend,
    AudioEvent,
    FinalizeEvent,
    Hypothesis,
    RecognizerEvent,
    StreamOptions,
)
from services.llm.backend import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    LlmBackend,
    PromptUsage,
    TokenText,
)
from services.llm.backends.pieces import piece_events, text_events
from services.llm.reasoning import ThinkSplitter
from services.llm.tools import ToolCall, new_call_id
from services.runtime.audio import FloatAudio
from services.runtime.streams import StreamQueue
from services.tts.backend import SynthesisJob, SynthesisMode, TtsBackend, Voice


class LoadGate:
    """Lets a test hold a backend in `load` to observe the server while the model loads."""

    def __init__(self, open_at_start: bool = True) -> None:
        self.event = asyncio.Event()
        if open_at_start:
            self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


class CountingAsrBackendDouble(AsrBackend):
    """Transcribes audio as one word "tick" per 100 ms of non-silent audio.

    Enough to check offsets, interim de-duplication, finalize answers and resampling exactly.
    """

    name = "double"

    def __init__(self, gate: LoadGate | None = None) -> None:
        self.gate = gate or LoadGate()
        self.open_streams = 0
        self.closed_streams = 0
        self.samples_seen = 0

    @property
    def model_name(self) -> str:
        return "counting-double"

    @property
    def languages(self) -> Sequence[str]:
        return ("en", "de")

    async def load(self) -> None:
        await self.gate.wait()

    async def recognize(
        self, options: StreamOptions, events: StreamQueue[RecognizerEvent]
    ) -> AsyncIterator[Hypothesis]:
        self.open_streams += 1
        voiced = 0
        total = 0
        try:
            async for event in events:
                if isinstance(event, AudioEvent):
                    self.samples_seen += event.samples.size
                    total += event.samples.size
                    if float(np.sqrt(np.mean(event.samples**2))) > 0.01:
                        voiced += event.samples.size
                    yield Hypothesis(self._text(voiced), 1000 * total / 16000, stability=0.5)
                else:
                    assert isinstance(event, FinalizeEvent)
                    yield Hypothesis(self._text(voiced), 1000 * total / 16000, answers=event)
                    if not event.soft:
                        voiced = total = 0
        finally:
            self.closed_streams += 1

    @staticmethod
    def _text(voiced_samples: int) -> str:
        return " ".join(["tick"] * (voiced_samples // 1600))


TONE_VOICE = Voice("tone", ("en",), 16000)
LOW_TONE_VOICE = Voice("low-tone", ("en", "de"), 22050)


class ToneTtsBackendDouble(TtsBackend):
    """Speaks 100 ms of a sine tone per word, one chunk per word, `word_delay_s` apart."""

    name = "double"

    def __init__(self, word_delay_s: float = 0.0) -> None:
        self.word_delay_s = word_delay_s
        self.jobs: list[SynthesisJob] = []
        self.active = 0
        self.closed = 0

    @property
    def model_name(self) -> str:
        return "tone-double"

    @property
    def voices(self) -> Sequence[Voice]:
        return (TONE_VOICE, LOW_TONE_VOICE)

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[FloatAudio]:
        self.jobs.append(job)
        self.active += 1
        try:
            rate = job.voice.sample_rate_hz
            words = job.text.split()
            t = np.arange(rate // 10, dtype=np.float32) / rate
            word = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            if job.mode is SynthesisMode.BATCH:
                await asyncio.sleep(self.word_delay_s * len(words))
                if words:
                    yield np.concatenate([word] * len(words))
                return
            for _ in words:
                await asyncio.sleep(self.word_delay_s)
                yield word
        finally:
            self.active -= 1
            self.closed += 1


#: What the LLM double answers in the shared fixtures and the double server processes.
REPLY = (
    "Sure, I can help with that today. The weather in Paris is mild, around 18 degrees. "
    "Dr. Smith recommends a light jacket. Anything else?"
)


class ScriptedLlmBackendDouble(LlmBackend):
    """Answers every request with `reply`, one whitespace-led word per token."""

    name = "double"

    def __init__(self, reply: str, token_delay_s: float = 0.0) -> None:
        self.reply = reply
        self.token_delay_s = token_delay_s
        self.tokens_generated = 0
        self.requests: list[GenerationRequest] = []
        self.closed = 0

    @property
    def model_name(self) -> str:
        return "scripted-double"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        yield PromptUsage(sum(len(m.content.split()) for m in request.messages))
        words = self.reply.split(" ")
        tokens = [words[0]] + [" " + w for w in words[1:]]
        try:
            for index, token in enumerate(tokens):
                if index >= request.sampling.max_tokens:
                    yield Finished(FinishReason.LENGTH)
                    return
                await asyncio.sleep(self.token_delay_s)
                self.tokens_generated += 1
                yield TokenText(token)
            yield Finished(FinishReason.STOP)
        finally:
            self.closed += 1


class ThreadLoadedLlmBackendDouble(ScriptedLlmBackendDouble):
    """Loads in a worker thread that blocks for `load_s` seconds, as reading weights does.

    `loading` is set once the thread blocks; setting `release` ends the load early.
    """

    def __init__(self, reply: str, load_s: float = 2.0) -> None:
        import threading  # only this double blocks a thread

        super().__init__(reply)
        self.load_s = load_s
        self.loading = threading.Event()
        self.release = threading.Event()

    async def load(self) -> None:
        await asyncio.to_thread(self._read_weights)

    def _read_weights(self) -> None:
        self.loading.set()
        self.release.wait(self.load_s)


class OtlpReceiverDouble(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it receives (a test stand-in for a collector, over the real protocol)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []  # (service.name, span)
        self._arrived = asyncio.Event()

    async def Export(self, request, context):  # type: ignore[no-untyped-def]
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "?",
            )
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        self._arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def register(self, server: grpc.aio.Server) -> None:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)

    async def wait_for(self, names: set[str], timeout_s: float = 10.0) -> None:
        """Until spans of all `names` have arrived or `timeout_s` passed (the caller asserts)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not names <= {span.name for _, span in self.spans}:
                    self._arrived.clear()
                    await self._arrived.wait()


class ThinkingLlmBackendDouble(LlmBackend):
    """A model that reasons in <think> tags, its tags split across tokens."""

    name = "thinking-double"
    TOKENS = (
        "<th",
        "ink>",
        "The user",
        " wants",
        " a number.",
        "</thi",
        "nk>",
        "\n\nSeven",
        ". Done.",
    )

    @property
    def model_name(self) -> str:
        return "thinking-double"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        yield PromptUsage(12)
        splitter = ThinkSplitter()
        for token in self.TOKENS:
            for event in text_events(splitter, token, 1):
                yield event
        for event in piece_events(splitter.flush(), 0, splitter.inside):
            yield event
        yield Finished(FinishReason.STOP)


class ToolCallingLlmBackendDouble(LlmBackend):
    """A model that calls tools: a short answer, then one call per `calls` entry; asked again
    with the results (the last message a tool result), it answers with them.

    `calls` are (tool name, arguments JSON) pairs; arguments may break the tool's schema, as an
    unconstrained upstream model's can.
    """

    name = "tool-calling-double"

    def __init__(self, calls: Sequence[tuple[str, str]], preamble: str = "Let me check.") -> None:
        self.calls = tuple(calls)
        self.preamble = preamble
        self.requests: list[GenerationRequest] = []

    @property
    def model_name(self) -> str:
        return "tool-calling-double"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        yield PromptUsage(10)
        last = request.messages[-1]
        if last.role == "tool" or not request.offered_tools:
            results = [m.content for m in request.messages if m.role == "tool"]
            answer = "The results are: " + ", ".join(results) + "." if results else "Hello."
            for word in answer.split(" "):
                yield TokenText(word + " ")
            yield Finished(FinishReason.STOP)
            return
        for word in self.preamble.split():
            yield TokenText(word + " ")
        for name, arguments in self.calls:
            yield TokenText("", 5)  # the call's own tokens: counted, never spoken
            yield ToolCall(new_call_id(), name, arguments)
        yield Finished(FinishReason.STOP)

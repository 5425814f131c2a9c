"""Nothing blocks the event loop, and every generator is closed.

A model load that blocks a thread leaves the health service answering (NOT_SERVING, then
SERVING); the vLLM engine is built in a thread, and shut down if its load is cancelled meanwhile;
`rpc_errors` closes the servicer method it wraps when a call ends early. The bounded queues of
the NeMo backends are checked in test_asr_parakeet.py and test_tts_magpie.py.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections.abc import AsyncGenerator, AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.llm.backends.vllm import VllmLlmBackend
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.errors import rpc_errors
from tests.doubles import REPLY, ThreadLoadedLlmBackendDouble
from tests.servers import channel_to, running

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LLM = "nemotron.speech.v1.LlmService"


async def health_within(channel: grpc.aio.Channel, service: str = "", timeout_s: float = 2) -> int:
    """The health status; a server whose event loop is blocked fails this (DEADLINE_EXCEEDED)."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    return int((await stub.Check(request, timeout=timeout_s)).status)


async def test_health_answers_not_serving_while_the_model_loads_in_a_blocking_thread():
    backend = ThreadLoadedLlmBackendDouble(REPLY, load_s=30)
    service = LlmService(LlmSettings(port=0), backend)
    async with running(service, wait=False) as server, channel_to(server) as channel:
        try:
            assert await asyncio.to_thread(backend.loading.wait, 10)
            for _ in range(3):
                assert await health_within(channel) == NOT_SERVING
                assert await health_within(channel, LLM) == NOT_SERVING
        finally:
            backend.release.set()
        await asyncio.wait_for(server.wait_loaded(), 10)
        assert await health_within(channel) == SERVING
        assert await health_within(channel, LLM) == SERVING


# ---- vLLM, through a stand-in for its module (vLLM itself needs a GPU) ----------------------


class _FakeEngine:
    """The parts of vLLM's `AsyncLLM` that loading and the warm-up use."""

    def __init__(self) -> None:
        self.model_config = SimpleNamespace(max_model_len=4096)
        self.shut_down = threading.Event()

    async def get_tokenizer(self) -> Any:
        def apply_chat_template(messages: list[Any], tokenize: bool = True, **_: Any) -> Any:
            # As a Hugging Face tokenizer does: token ids, or the prompt text with tokenize=False.
            return [1] * (8 * len(messages)) if tokenize else "<|user|>hi<|assistant|>"

        return SimpleNamespace(apply_chat_template=apply_chat_template)

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        completion = SimpleNamespace(text="Hello", token_ids=[1], finish_reason="stop")
        yield SimpleNamespace(num_cached_tokens=0, outputs=[completion])

    async def abort(self, request_id: str) -> None:
        pass

    def shutdown(self) -> None:
        self.shut_down.set()


class _EngineBuild:
    """`AsyncLLMEngine.from_engine_args`: blocks its thread until released, as loading does."""

    def __init__(self) -> None:
        self.engine = _FakeEngine()
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self, args: Any) -> _FakeEngine:
        self.threads.append(threading.current_thread())
        self.started.set()
        self.release.wait(30)
        return self.engine


@pytest.fixture
def engine_build(monkeypatch: pytest.MonkeyPatch) -> _EngineBuild:
    build = _EngineBuild()
    vllm = types.ModuleType("vllm")
    vllm.AsyncEngineArgs = SimpleNamespace
    vllm.AsyncLLMEngine = SimpleNamespace(from_engine_args=build)
    vllm.SamplingParams = SimpleNamespace
    sampling_params = types.ModuleType("vllm.sampling_params")
    sampling_params.RequestOutputKind = SimpleNamespace(DELTA="delta")
    sampling_params.StructuredOutputsParams = SimpleNamespace
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_params)
    return build


async def test_the_vllm_engine_is_built_off_the_loop_so_health_answers_meanwhile(engine_build):
    settings = LlmSettings(port=0, backend="vllm", model="org/Some-Model")
    service = LlmService(settings, VllmLlmBackend.from_settings(settings))
    async with running(service, wait=False) as server, channel_to(server) as channel:
        try:
            assert await asyncio.to_thread(engine_build.started.wait, 10)
            assert await health_within(channel, LLM) == NOT_SERVING
        finally:
            engine_build.release.set()
        await asyncio.wait_for(server.wait_loaded(), 10)
        assert await health_within(channel, LLM) == SERVING
    assert engine_build.threads[0] is not threading.main_thread()
    assert engine_build.engine.shut_down.is_set()


async def test_a_vllm_load_cancelled_mid_build_shuts_the_engine_down_once_built(engine_build):
    load = asyncio.create_task(VllmLlmBackend("org/Some-Model").load())
    assert await asyncio.to_thread(engine_build.started.wait, 10)
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    assert not engine_build.engine.shut_down.is_set()
    engine_build.release.set()
    assert await asyncio.to_thread(engine_build.engine.shut_down.wait, 10)


# ---- rpc_errors closes what it wraps -----------------------------------------------------


class _Ticker:
    """A servicer whose stream never ends by itself; its `finally` tells when it was closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    @rpc_errors
    async def Stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                yield bytes(64 * 1024)  # no await between responses: it waits at its yield
        finally:
            self.closed.set()


async def test_rpc_errors_closes_the_method_with_the_call_not_at_garbage_collection():
    ticker = _Ticker()
    responses = ticker.Stream(b"", None)
    assert await anext(responses)
    await responses.aclose()  # what ending the call early does to the wrapper
    assert ticker.closed.is_set()


async def test_a_servicer_method_is_closed_when_the_client_cancels():
    ticker = _Ticker()
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(ticker.Stream)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Ticker", {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/test.Ticker/Stream")(b"")
            assert len(await call.read()) == 64 * 1024
            call.cancel()
            await asyncio.wait_for(ticker.closed.wait(), 5)
    finally:
        await server.stop(None)

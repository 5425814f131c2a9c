"""The openai_upstream backend against a real OpenAI-compatible server (llama_cpp.server).

The upstream is llama-cpp-python's server with SmolLM2, started here as a subprocess on a free
loopback port; the LLM gRPC server in front of it is real too.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backend import Finished, FinishReason, PromptUsage, TokenText
from services.llm.backends.llama_cpp import default_model_path
from services.llm.backends.openai_upstream import (
    OpenAIUpstreamLlmBackend,
    events_of,
    parse_event,
    status_error,
)
from services.llm.generation import GenerationStats
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.server import MeshServer
from tests.helpers import read_all, read_rest
from tests.servers import channel_to, free_port, running

pytestmark = pytest.mark.slow

Req = llm_pb2.GenerateChunksRequest
CANCEL = Req(cancel=llm_pb2.CancelGeneration())
QUESTION = [("system", "Answer briefly."), ("user", "Tell me about the moon.")]
ENDLESS = llm_pb2.SamplingParams(temperature=2.0, top_k=0, top_p=1.0, max_tokens=400, seed=7)


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    """llama_cpp.server with SmolLM2 on `port`, once it answers /v1/models."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(default_model_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_upstream(process)
    raise RuntimeError("llama_cpp.server did not start within 45 s")


def stop_upstream(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    process = start_upstream(port)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_upstream(process)


def settings() -> LlmSettings:
    return LlmSettings(port=0, max_streams=8, shutdown_grace_s=0.5, continue_timeout_s=10)


@pytest.fixture
async def server(upstream: str) -> AsyncIterator[MeshServer]:
    backend = OpenAIUpstreamLlmBackend(upstream, read_timeout_s=30)
    async with running(LlmService(settings(), backend)) as server:
        yield server


@pytest.fixture
async def stub(server: MeshServer) -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    async with channel_to(server) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


def start(messages: list[tuple[str, str]], sampling: llm_pb2.SamplingParams | None = None) -> Req:
    return Req(
        start=llm_pb2.StartGeneration(
            messages=[llm_pb2.ChatMessage(role=r, content=c) for r, c in messages],
            sampling=sampling or llm_pb2.SamplingParams(temperature=0.0, max_tokens=32),
        )
    )


async def generate(
    stub: llm_pb2_grpc.LlmServiceStub, request: Req
) -> tuple[list, llm_pb2.GenerationDone]:
    responses = await read_all(stub.GenerateChunks(iter([request])))
    return [r.chunk for r in responses[:-1]], responses[-1].done


# ---- against the real upstream --------------------------------------------------------------


async def test_chunks_and_usage_from_the_upstream(stub, server):
    chunks, done = await generate(stub, start(QUESTION))
    assert chunks
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.text for c in chunks)
    assert done.finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH)
    assert 0 < sum(c.token_count for c in chunks) <= done.usage.completion_tokens <= 32
    assert server.service.backend.model_name.endswith(".gguf")  # learnt from /v1/models


async def test_max_tokens_ends_with_length(stub):
    _, done = await generate(stub, start(QUESTION, llm_pb2.SamplingParams(max_tokens=5)))
    assert done.finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert done.usage.completion_tokens == 5


async def test_a_stream_that_ends_without_finishing_is_unavailable(stub):
    # llama_cpp.server answers a prompt over its window with an empty event stream (its log says
    # why); llama-server and vLLM send a 400 instead (see the scripted tests below).
    huge = " ".join(["word"] * 3000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, start([("user", huge)]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "before the answer finished" in caught.value.details()
    _, done = await generate(stub, start(QUESTION))  # and the next request works
    assert done.usage.completion_tokens >= 1


@pytest.mark.timeout(120)
async def test_cancel_closes_the_stream_and_the_next_request_works(stub, server):
    for _ in range(4):
        call = stub.GenerateChunks()
        await call.write(start(QUESTION, ENDLESS))
        await call.read()
        await call.write(CANCEL)
        rest = await read_rest(call)
        assert rest[-1].done.finish_reason == llm_pb2.FINISH_REASON_CANCELLED
        _, done = await generate(stub, start(QUESTION, llm_pb2.SamplingParams(max_tokens=4)))
        assert done.usage.completion_tokens >= 1
    assert server.service.limiter.active == 0


@pytest.mark.timeout(120)
async def test_upstream_down_is_unavailable_and_the_server_recovers():
    port = free_port()
    backend = OpenAIUpstreamLlmBackend(f"http://127.0.0.1:{port}/v1", connect_timeout_s=1)
    async with running(LlmService(settings(), backend)) as server, channel_to(server) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub, start(QUESTION))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot be reached" in caught.value.details()

        process = await asyncio.to_thread(start_upstream, port)
        try:
            _, done = await generate(stub, start(QUESTION))
            assert done.usage.completion_tokens >= 1
        finally:
            await asyncio.to_thread(stop_upstream, process)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub, start(QUESTION))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- the mapping, with a scripted transport -------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (422, grpc.StatusCode.INVALID_ARGUMENT),
        (401, grpc.StatusCode.FAILED_PRECONDITION),
        (404, grpc.StatusCode.FAILED_PRECONDITION),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (500, grpc.StatusCode.UNAVAILABLE),
        (503, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_http_statuses_map_to_grpc_codes_with_the_upstream_message(status, code):
    error = status_error(status, '{"error": {"message": "the reason", "code": 7}}')
    assert error.code == code
    assert "the reason" in error.message
    assert f"HTTP {status}" in error.message


def test_a_plain_text_error_body_is_kept():
    assert "Bad Gateway" in status_error(502, "Bad Gateway\n").message


def test_usage_and_cached_tokens_come_from_the_usage_chunk():
    stats = GenerationStats()
    first = events_of({"choices": [{"delta": {"content": "Hi"}}]})
    assert first == [TokenText("Hi")]
    assert events_of({"choices": [{"delta": {}, "finish_reason": "length"}]}) == [
        Finished(FinishReason.LENGTH)
    ]
    usage = {
        "prompt_tokens": 40,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 32},
    }
    (last,) = events_of({"choices": [], "usage": usage})
    for event in (*first, Finished(FinishReason.LENGTH), last):
        stats.record(event)
    counts = (stats.prompt_tokens, stats.cached_prompt_tokens, stats.usage_completion_tokens)
    assert counts == (40, 32, 3)
    assert stats.completion_tokens == 1  # the deltas received; the usage is the server's count
    assert stats.finish_reason == FinishReason.LENGTH


def test_llama_server_timings_give_the_cached_tokens():
    event = {"choices": [], "usage": {"prompt_tokens": 9}, "timings": {"cache_n": 6}}
    assert events_of(event) == [PromptUsage(9, 6, None)]


def test_sse_lines():
    assert parse_event(": keep-alive") is None
    assert parse_event("") is None
    assert parse_event('data: {"a": 1}') == {"a": 1}
    assert parse_event("data: [DONE]") == {}


async def test_an_error_event_in_the_stream_and_an_http_error_end_the_call():
    def handler(request: httpx.Request) -> httpx.Response:
        if b"first" in request.content:
            body = (
                b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
                b'data: {"error": {"message": "slot crashed", "code": 500}}\n\n'
            )
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        if b"second" in request.content:
            return httpx.Response(429, json={"error": {"message": "too many requests"}})
        body = (
            b'data: {"error": {"code": 400, "message": "the request exceeds the available '
            b'context size", "type": "exceed_context_size_error"}}\n\n'
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    backend = OpenAIUpstreamLlmBackend(
        "http://upstream.invalid/v1", model="m", transport=httpx.MockTransport(handler)
    )
    async with running(LlmService(settings(), backend)) as server, channel_to(server) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub, start([("user", "first")]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "slot crashed" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub, start([("user", "second")]))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many requests" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub, start([("user", "third")]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context size" in caught.value.details()

"""The shared server runtime: health, reflection, limits, errors, shutdown, settings, CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc, tts_pb2, tts_pb2_grpc
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.streams import StreamQueue
from tests.doubles import REPLY, CountingAsrBackendDouble, LoadGate, ScriptedLlmBackendDouble
from tests.helpers import read_all, read_rest
from tests.servers import ROOT, channel_to, running, start_serve_double, target_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_health_is_not_serving_while_loading_then_serving():
    gate = LoadGate(open_at_start=False)
    service = AsrService(AsrSettings(port=0), CountingAsrBackendDouble(gate))
    async with running(service, wait=False) as server, channel_to(server) as channel:
        assert await health_of(channel) == NOT_SERVING
        assert await health_of(channel, "nemotron.speech.v1.AsrService") == NOT_SERVING
        gate.event.set()
        await server.wait_loaded()
        assert await health_of(channel) == SERVING
        assert await health_of(channel, "nemotron.speech.v1.AsrService") == SERVING


async def test_reflection_lists_the_services(tts_server):
    def ask() -> tuple[set[str], object]:
        # The reflection client is synchronous: run it off the loop that hosts the server.
        with grpc.insecure_channel(f"127.0.0.1:{tts_server.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            return set(database.get_services()), database.FindFileContainingSymbol(
                "nemotron.speech.v1.TtsService"
            )

    services, described = await asyncio.to_thread(ask)
    assert {"nemotron.speech.v1.TtsService", "grpc.health.v1.Health"} <= services
    assert described.package == "nemotron.speech.v1"


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl comes with the dev group")
async def test_grpcurl_lists_and_describes_through_reflection(llm_server):
    target = f"127.0.0.1:{llm_server.port}"

    def grpcurl(*args: str) -> str:
        done = subprocess.run(
            ["grpcurl", "-plaintext", *args], capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout

    listed = await asyncio.to_thread(grpcurl, target, "list")
    assert "nemotron.speech.v1.LlmService" in listed.split()
    described = await asyncio.to_thread(
        grpcurl, target, "describe", "nemotron.speech.v1.ChunkingPolicy"
    )
    assert "wait_for_continue" in described and "first chunk" in described


async def test_unexpected_errors_become_a_generic_internal(llm_stub, llm_backend):
    async def broken(request):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internal detail")
        yield ""  # pragma: no cover

    llm_backend.generate = broken  # type: ignore[method-assign]
    request = llm_pb2.GenerateChunksRequest(
        start=llm_pb2.StartGeneration(messages=[llm_pb2.ChatMessage(role="user", content="hi")])
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(llm_stub.GenerateChunks(iter([request])))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details()


async def test_a_server_fault_is_logged_as_a_warning_a_client_mistake_is_not(
    llm_stub, llm_backend, caplog
):
    from services.runtime.errors import Internal, InvalidArgument

    def failing_with(err: Exception):  # type: ignore[no-untyped-def]
        async def generate(request):  # type: ignore[no-untyped-def]
            raise err
            yield ""  # pragma: no cover

        return generate

    request = llm_pb2.GenerateChunksRequest(
        start=llm_pb2.StartGeneration(messages=[llm_pb2.ChatMessage(role="user", content="hi")])
    )
    caplog.set_level("INFO", logger="services.runtime.errors")
    for err, level in (
        (Internal("the LLM engine failed to decode"), "WARNING"),
        (InvalidArgument("a bad field", field="start"), "INFO"),
    ):
        caplog.clear()
        llm_backend.generate = failing_with(err)  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all(llm_stub.GenerateChunks(iter([request])))
        assert caught.value.code() == err.code
        ended = [r for r in caplog.records if r.getMessage().startswith("rpc ended with")]
        assert [r.levelname for r in ended] == [level], caplog.text


async def test_only_a_full_replica_is_retried_elsewhere_other_limits_are_not(
    llm_server, llm_backend
):
    """The clients' retry policy replays AtCapacity on the next replica, nothing else."""
    from clients.channel import START_ATTEMPTS, open_channel
    from clients.security import ClientSecurity
    from services.runtime.errors import AtCapacity, ResourceExhausted

    request = llm_pb2.GenerateChunksRequest(
        start=llm_pb2.StartGeneration(messages=[llm_pb2.ChatMessage(role="user", content="hi")])
    )
    async with open_channel(target_of(llm_server), ClientSecurity()) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        for err, tries in (
            (ResourceExhausted("the context window is full"), 1),
            (AtCapacity("this replica is full"), START_ATTEMPTS),
        ):
            calls = 0

            async def refusing(request, err=err):  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                raise err
                yield ""  # pragma: no cover

            llm_backend.generate = refusing  # type: ignore[method-assign]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read_all(stub.GenerateChunks(iter([request])))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert calls == tries, type(err).__name__


async def test_stop_drains_open_streams_within_the_grace_period():
    backend = ScriptedLlmBackendDouble(REPLY, token_delay_s=0.01)
    service = LlmService(LlmSettings(port=0, shutdown_grace_s=3.0), backend)
    async with running(service) as server, channel_to(server) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        request = llm_pb2.GenerateChunksRequest(
            start=llm_pb2.StartGeneration(messages=[llm_pb2.ChatMessage(role="user", content="hi")])
        )
        call = stub.GenerateChunks(iter([request]))
        first = await call.read()
        stopping = asyncio.create_task(server.stop())
        rest = [r async for r in _rest(call)]
        await stopping
    assert first.HasField("chunk")
    assert rest[-1].done.finish_reason == llm_pb2.FINISH_REASON_STOP


async def _rest(call: grpc.aio.StreamStreamCall) -> AsyncIterator[llm_pb2.GenerateChunksResponse]:
    while (response := await call.read()) is not grpc.aio.EOF:
        yield response


@pytest.mark.slow
async def test_sigterm_lets_an_open_stream_finish_then_exits_cleanly():
    server = await start_serve_double("tts", "--shutdown-grace-s", "5")
    try:
        await server.wait_serving()
        async with grpc.aio.insecure_channel(server.target) as channel:
            tts = tts_pb2_grpc.TtsServiceStub(channel)
            requests = [
                tts_pb2.SynthesizeRequest(config=tts_pb2.SynthesisConfig()),
                tts_pb2.SynthesizeRequest(
                    text=tts_pb2.TextSegment(segment_id="a", text="one two three four")
                ),
                tts_pb2.SynthesizeRequest(close=tts_pb2.CloseStream()),
            ]
            call = tts.Synthesize(iter(requests))
            await call.read()
            server.process.send_signal(signal.SIGTERM)
            responses = await read_rest(call)
        assert responses[-1].WhichOneof("response") == "done"
        assert await asyncio.wait_for(server.process.wait(), 15) == 0
    finally:
        await server.stop()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nemotron_speech", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_cli_rejects_bad_settings_with_the_variable_named():
    done = _cli("serve", "asr", "--check-config", env={"NEMOTRON_ASR_MAX_STREAMS": "0"})
    assert done.returncode == 2
    assert "max_streams" in done.stderr


def test_cli_names_an_unknown_backend_and_the_choices():
    done = _cli("serve", "llm", "--backend", "nope")
    assert done.returncode == 3
    assert "unknown llm backend 'nope'" in done.stderr and "llama_cpp" in done.stderr


def test_flags_override_environment_which_overrides_defaults(monkeypatch):
    import argparse

    from services.runtime.settings import add_settings_flags, settings_from_flags

    parser = argparse.ArgumentParser()
    add_settings_flags(parser, AsrSettings)
    monkeypatch.setenv("NEMOTRON_ASR_PORT", "9999")
    monkeypatch.setenv("NEMOTRON_ASR_MAX_STREAMS", "3")
    settings = settings_from_flags(AsrSettings, parser.parse_args(["--max-streams", "5"]))
    assert (settings.port, settings.max_streams, settings.host) == (9999, 5, "127.0.0.1")
    assert settings_from_flags(AsrSettings, parser.parse_args(["--log-content"])).log_content


def test_servers_bind_loopback_by_default():
    from services.llm.settings import LlmSettings
    from services.tts.settings import TtsSettings

    defaults = [(s().host, s().port) for s in (AsrSettings, TtsSettings, LlmSettings)]
    assert defaults == [("127.0.0.1", 8080), ("127.0.0.1", 8001), ("127.0.0.1", 8000)]


async def test_stream_queue_bounds_discards_and_fails():
    queue: StreamQueue[int] = StreamQueue(2)
    await queue.put(1)
    await queue.put(2)
    blocked = asyncio.create_task(queue.put(3))
    await asyncio.sleep(0.01)
    assert not blocked.done(), "a full queue applies backpressure"
    assert queue.discard(lambda item: item == 1) == 1
    await asyncio.wait_for(blocked, 1)
    queue.fail(ValueError("boom"))
    assert [await queue.get(), await queue.get()] == [2, 3]
    with pytest.raises(ValueError, match="boom"):
        await queue.get()

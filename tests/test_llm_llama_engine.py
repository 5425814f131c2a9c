"""The llama.cpp engine's start-up choices: extra weight buffers (forced, probed, cached).

The servers are real processes (`python -m services.llm`) with the real SmolLM2 model: the
point is that they start and serve on whatever CPU runs the tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backends import llama_probe
from services.llm.backends.llama_cpp import default_model_path
from services.llm.backends.llama_probe import HostUnsupported, choose_extra_buffers

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _serve_and_ask(extra_buffers: str, cache: Path) -> str:
    """Start a real LLM server, ask one question, stop it; returns its log."""
    port = _free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    command = [sys.executable, "-m", "services.llm", "--port", str(port), "--slots", "2"]
    command += ["--extra-buffers", extra_buffers, "--threads", "2", "--context-window", "1024"]
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 90
            while True:
                assert process.returncode is None, f"the server exited with {process.returncode}"
                assert time.monotonic() < deadline, "the server did not become ready"
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.3)
            start = llm_pb2.StartGeneration(
                messages=[llm_pb2.ChatMessage(role="user", content="Say hello.")],
                sampling=llm_pb2.SamplingParams(temperature=0.0, max_tokens=8),
            )
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            calls = stub.GenerateChunks(iter([llm_pb2.GenerateChunksRequest(start=start)]))
            responses = [r async for r in calls]
            assert responses[-1].done.usage.completion_tokens >= 1
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    log = err.decode()
    assert process.returncode == 0, log[-2000:]
    return log


@pytest.mark.timeout(180)
async def test_the_server_serves_with_extra_buffers_forced_off(tmp_path):
    log = await _serve_and_ask("off", tmp_path)
    assert "extra weight buffers off: forced off" in log
    assert "llama_cpp memory: weights" in log
    assert not (tmp_path / "nemotron-speech").exists()  # nothing probed, nothing cached


@pytest.mark.timeout(180)
async def test_the_server_serves_with_the_automatic_choice_and_caches_it(tmp_path):
    log = await _serve_and_ask("auto", tmp_path)
    assert "extra weight buffers" in log and "child process" in log
    verdicts = json.loads((tmp_path / "nemotron-speech" / "llama-extra-buffers.json").read_text())
    assert len(verdicts) == 1
    # The next start on this host reuses the verdict instead of probing again.
    assert "(cached verdict)" in await _serve_and_ask("auto", tmp_path)


def _children(monkeypatch, statuses: list[int]) -> list[bool]:
    """Replace the probe's child process by the given exit statuses; returns the calls made."""
    calls: list[bool] = []

    async def run_child(_model: Path, _layers: int, *, extra_buffers: bool) -> int:
        calls.append(extra_buffers)
        return statuses[len(calls) - 1]

    monkeypatch.setattr(llama_probe, "_run_child", run_child)
    return calls


async def test_a_probe_that_crashes_with_extra_buffers_turns_them_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = _children(monkeypatch, [-signal.SIGSEGV, 0])
    choice = await choose_extra_buffers(
        "auto", default_model_path(), gpu_layers=0, all_on_gpu=False
    )
    assert not choice.enabled
    assert "SIGSEGV" in choice.reason
    assert calls == [True, False]


async def test_a_build_for_other_cpu_features_is_reported_not_crashed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _children(monkeypatch, [-signal.SIGILL])
    with pytest.raises(HostUnsupported, match="SIGILL"):
        await choose_extra_buffers("auto", default_model_path(), gpu_layers=0, all_on_gpu=False)
    assert not (tmp_path / "nemotron-speech").exists()  # no verdict kept for a broken build


async def test_forced_choices_and_a_gpu_model_do_not_probe(monkeypatch):
    calls = _children(monkeypatch, [])
    model = default_model_path()
    on = await choose_extra_buffers("on", model, gpu_layers=0, all_on_gpu=False)
    off = await choose_extra_buffers("off", model, gpu_layers=0, all_on_gpu=False)
    gpu = await choose_extra_buffers("auto", model, gpu_layers=-1, all_on_gpu=True)
    assert (on.enabled, off.enabled, gpu.enabled) == (True, False, False)
    assert calls == []

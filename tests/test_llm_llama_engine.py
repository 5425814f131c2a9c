"""The llama.cpp engine's start-up choices: extra weight buffers (forced, probed, cached).

The servers are real processes (`python -m services.llm`) with the real SmolLM2 model: the
point is that they start and serve on whatever CPU runs the tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backend import Sampling
from services.llm.backends import llama_probe
from services.llm.backends.llama_cpp import default_model_path
from services.llm.backends.llama_probe import HostUnsupported, choose_extra_buffers
from tests.servers import start_server_process

pytestmark = pytest.mark.slow


async def _serve_and_ask(extra_buffers: str, cache: Path) -> str:
    """Start a real LLM server, ask one question, stop it; returns its log."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    command = [sys.executable, "-m", "services.llm", "--port", "0", "--slots", "2"]
    command += ["--extra-buffers", extra_buffers, "--threads", "2", "--context-window", "1024"]
    server = await start_server_process(command, env, timeout_s=90)
    try:
        await server.wait_serving(timeout_s=90)
        async with grpc.aio.insecure_channel(server.target) as channel:
            start = llm_pb2.StartGeneration(
                messages=[llm_pb2.ChatMessage(role="user", content="Say hello.")],
                sampling=llm_pb2.SamplingParams(temperature=0.0, max_tokens=8),
            )
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            calls = stub.GenerateChunks(iter([llm_pb2.GenerateChunksRequest(start=start)]))
            responses = [r async for r in calls]
            assert responses[-1].done.usage.completion_tokens >= 1
    finally:
        log = await server.stop(grace_s=30)
    assert server.process.returncode == 0, log[-2000:]
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


# ---- the batch engine itself, in process -------------------------------------------------------


@pytest.fixture
async def engine():
    from services.llm.backends.llama_engine import BatchEngine
    from services.llm.backends.llama_model import LlamaModel, MemoryReport

    model = LlamaModel(
        default_model_path(), gpu_layers=0, extra_buffers=False, report=MemoryReport()
    )
    engine = BatchEngine(model, sequences=2, window=512, threads=2)
    await engine.start()
    yield engine
    await engine.aclose()
    model.close()


def _prompt(engine, text: str) -> list[int]:
    chat = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return engine.model.tokenize(chat.encode(), add_special=False, parse_special=True)


GREEDY = Sampling(temperature=0.0, max_tokens=64)


async def test_a_paused_sequence_does_not_hold_the_other_back(engine):
    await engine.begin(0, _prompt(engine, "Tell me about the sea."), GREEDY)
    await engine.begin(1, _prompt(engine, "Tell me about the sky."), GREEDY)
    await engine.next_token(0)  # sequence 0 got one token and then its reader paused
    steps_before = engine.steps
    for _ in range(10):
        await asyncio.wait_for(engine.next_token(1), 5)
    assert engine.steps - steps_before >= 10  # sequence 1 went on alone
    await asyncio.wait_for(engine.next_token(0), 5)  # and 0 picks up where it paused
    engine.end(0)
    engine.end(1)


async def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    import llama_cpp

    from services.llm.backends import llama_engine
    from services.runtime.errors import Internal

    real_decode = llama_cpp.llama_decode
    calls = {"n": 0}

    def failing_once(context, batch):
        calls["n"] += 1
        return -1 if calls["n"] == 1 else real_decode(context, batch)

    monkeypatch.setattr(llama_engine.llama_cpp, "llama_decode", failing_once)
    await engine.begin(0, _prompt(engine, "Hello."), GREEDY)
    with pytest.raises(Internal, match=r"failed to decode|llama_decode"):
        await engine.next_token(0)
    engine.end(0)
    # The sequence's cells were cleared; a new request on it evaluates its prompt from scratch.
    assert await engine.begin(0, _prompt(engine, "Hello."), GREEDY) == 0
    assert isinstance(await asyncio.wait_for(engine.next_token(0), 10), int)
    engine.end(0)


async def test_ending_a_request_while_its_prompt_is_read_frees_the_sequence(engine):
    long_prompt = _prompt(engine, " ".join(["word"] * 400))
    await engine.begin(0, long_prompt, GREEDY)
    waiting = asyncio.ensure_future(engine.next_token(0))
    await asyncio.sleep(0.01)  # the first piece of the prompt is being read
    waiting.cancel()
    engine.end(0)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The next request on the sequence reuses whatever of the prompt reached the cache.
    short = _prompt(engine, "Hi.")
    await engine.begin(0, short, GREEDY)
    assert isinstance(await asyncio.wait_for(engine.next_token(0), 10), int)
    engine.end(0)
    assert 0 < len(engine.cached_tokens(0)) <= len(short) + 1


async def test_a_sequence_that_fills_its_window_fails_alone(engine):
    from services.runtime.errors import ResourceExhausted

    words = 400
    while len(_prompt(engine, " ".join(["word"] * words))) < engine.window - 3:
        words += 10
    prompt = _prompt(engine, " ".join(["word"] * words))[: engine.window - 2]
    await engine.begin(0, prompt, GREEDY)
    await engine.begin(1, _prompt(engine, "Hi."), GREEDY)
    for _ in range(5):
        full, other = await asyncio.gather(
            engine.next_token(0), engine.next_token(1), return_exceptions=True
        )
        assert isinstance(other, int)
        if isinstance(full, BaseException):
            break
    assert isinstance(full, ResourceExhausted) and "window" in str(full)
    # The other conversation goes on.
    assert isinstance(await asyncio.wait_for(engine.next_token(1), 10), int)
    engine.end(0)
    engine.end(1)

"""The load test and the transport benchmark, at tiny scale, against real gRPC servers with
test-double engines (CI proves the tools work; the figures come from the real engines)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from loadtest.__main__ import check_loopback
from loadtest.transport import report as transport_report
from loadtest.transport import run as run_transport
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.doubles import (
    REPLY,
    CountingAsrBackendDouble,
    ScriptedLlmBackendDouble,
    ToneTtsBackendDouble,
)
from tests.servers import running

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_loadtest_ramps_and_writes_table_json_and_png(tmp_path):
    asr = AsrService(AsrSettings(port=0), CountingAsrBackendDouble())
    tts = TtsService(TtsSettings(port=0), ToneTtsBackendDouble())
    llm = LlmService(LlmSettings(port=0), ScriptedLlmBackendDouble(REPLY))
    async with running(asr) as a, running(tts) as t, running(llm) as m:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest",
            "--asr",
            f"127.0.0.1:{a.port}",
            "--tts",
            f"127.0.0.1:{t.port}",
            "--llm",
            f"127.0.0.1:{m.port}",
            "--steps",
            "1,2",
            "--turns",
            "2",
            "--speed",
            "20",
            "--question",
            "one two three",
            "--json",
            str(tmp_path / "lt.json"),
            "--png",
            str(tmp_path / "lt.png"),
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 100)
    assert process.returncode == 0, out.decode()
    assert "capacity: 2 concurrent conversations" in out.decode()
    document = json.loads((tmp_path / "lt.json").read_text())
    assert [s["callers"] for s in document["steps"]] == [1, 2]
    assert [s["turns_ok"] for s in document["steps"]] == [2, 4]
    first = document["steps"][0]["latency_ms"]
    assert 0 < first["asr_ttfb_ms"]["p50"] and 0 < first["turn_ms"]["p50"]
    assert (tmp_path / "lt.png").read_bytes()[:4] == b"\x89PNG"


def test_loadtest_takes_replica_lists_on_loopback_only():
    check_loopback("ipv4:127.0.0.2:8080,127.0.0.3:8080", "dns:///localhost:8001", "[::1]:8000")
    with pytest.raises(SystemExit, match="loopback only"):
        check_loopback("ipv4:127.0.0.2:8080,10.1.2.3:8080")


async def test_loadtest_refuses_non_loopback_targets():
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest",
        "--asr",
        "10.1.2.3:8080",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode != 0 and b"loopback only" in err


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_transport_benchmark_measures_every_path():
    results = await run_transport(frames=60, streams=2)
    paths = {(r.service, r.transport) for r in results}
    assert paths == {
        (s, t) for s in ("asr", "tts") for t in ("grpc", "grpc-bare", "websocket", "inprocess")
    }
    assert all(r.latency_ms.count == (60 if r.service == "asr" else 12) for r in results)
    assert all(r.messages_per_s > 0 for r in results)
    text = transport_report(results)
    assert "over the direct call" in text and "WebSocket" in text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_engine_step_benchmark_prints_its_figures(capsys):
    from loadtest.llm_steps import main as llm_steps

    assert llm_steps(["--steps", "3", "--sequences", "1,2", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 sequences: ms per step" in out and "2 sequences: ms per step" in out
    assert "prompt of 300: tokens/s" in out and "x one" in out

"""The client floor: targets, retryable codes, the readiness wait, and the import rule."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bots import grpc_client
from clients.channel import KEEPALIVE_TIME_MS
from clients.retry import RETRYABLE_CODES, is_retryable
from clients.serving import wait_serving
from clients.targets import DEFAULT_PORTS, TARGET_ENV, Targets, target_of
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.settings import LlmSettings
from services.runtime import errors
from services.runtime.server import MIN_CLIENT_PING_INTERVAL_MS
from services.tts.settings import TtsSettings
from tests.doubles import CountingAsrBackendDouble, LoadGate
from tests.servers import free_port, running

ROOT = Path(__file__).resolve().parent.parent


# ---- targets ----------------------------------------------------------------------------------


@pytest.fixture
def no_target_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for variable in TARGET_ENV.values():
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_target_of_is_the_default_port_on_the_given_host(no_target_env):
    assert target_of("asr") == "127.0.0.1:8080"
    assert target_of("tts", "speech-gpu") == "speech-gpu:8001"
    assert target_of("llm") == "127.0.0.1:8000"


def test_target_of_takes_the_environment_first(no_target_env):
    no_target_env.setenv("NVIDIA_TTS_URL", "tts.internal:9001")
    assert target_of("tts", "speech-gpu") == "tts.internal:9001"
    no_target_env.setenv("NVIDIA_TTS_URL", "")  # empty counts as unset
    assert target_of("tts") == "127.0.0.1:8001"


def test_targets_fill_unset_fields_from_the_environment(no_target_env):
    no_target_env.setenv("NVIDIA_LLM_URL", "10.0.0.5:8000")
    targets = Targets(asr="127.0.0.1:1")
    assert targets == Targets("127.0.0.1:1", "127.0.0.1:8001", "10.0.0.5:8000")


def test_the_servers_listen_where_clients_look_by_default(monkeypatch):
    for variable in ("NEMOTRON_ASR_PORT", "NEMOTRON_TTS_PORT", "NEMOTRON_LLM_PORT"):
        monkeypatch.delenv(variable, raising=False)
    assert AsrSettings().port == DEFAULT_PORTS["asr"]
    assert TtsSettings().port == DEFAULT_PORTS["tts"]
    assert LlmSettings().port == DEFAULT_PORTS["llm"]


# ---- retry ------------------------------------------------------------------------------------


def test_servers_and_clients_share_one_set_of_retryable_codes():
    assert errors.RETRYABLE_CODES is RETRYABLE_CODES
    assert grpc_client.RETRYABLE is RETRYABLE_CODES
    assert errors.ResourceExhausted("busy").retryable
    assert not errors.InvalidArgument("bad").retryable
    assert is_retryable(TimeoutError()) and not is_retryable(ValueError())


# ---- readiness --------------------------------------------------------------------------------


async def test_wait_serving_returns_when_the_model_has_loaded():
    gate = LoadGate(open_at_start=False)
    service = AsrService(AsrSettings(port=0), CountingAsrBackendDouble(gate))
    async with running(service, wait=False) as server:
        waiting = asyncio.create_task(wait_serving(f"127.0.0.1:{server.port}", timeout_s=10))
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done  # health is NOT_SERVING while the model loads
        gate.event.set()
        await asyncio.wait_for(waiting, 5)


async def test_wait_serving_times_out_naming_the_target():
    gate = LoadGate(open_at_start=False)
    service = AsrService(AsrSettings(port=0), CountingAsrBackendDouble(gate))
    async with running(service, wait=False) as server:
        target = f"127.0.0.1:{server.port}"
        with pytest.raises(TimeoutError, match=target):
            await wait_serving(target, timeout_s=0.3)
        gate.event.set()


async def test_wait_serving_waits_for_a_server_that_is_not_listening_yet():
    port = free_port()
    waiting = asyncio.create_task(wait_serving(f"127.0.0.1:{port}", timeout_s=10))
    await asyncio.sleep(0.3)  # let it find nobody there first
    assert not waiting.done()
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await asyncio.wait_for(waiting, 5)
    finally:
        await server.stop(None)


# ---- the import rule --------------------------------------------------------------------------


def _imported_modules(package: str) -> dict[str, set[str]]:
    """For each .py file under `package`, the top-level names of what it imports."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", ["services", "bots", "loadtest"])
def test_nothing_below_the_cli_imports_it(package):
    offenders = [f for f, names in _imported_modules(package).items() if "nemotron_speech" in names]
    assert offenders == []


def test_clients_stand_on_nothing_of_ours():
    ours = {"services", "bots", "loadtest", "nemotron_speech", "tests"}
    offenders = {f: names & ours for f, names in _imported_modules("clients").items()}
    assert {f: names for f, names in offenders.items() if names} == {}


def test_a_service_main_runs_without_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "services.llm", "--backend", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3  # the same exit code as `nemotron-speech serve llm`
    assert "unknown llm backend 'nope'" in done.stderr


def test_client_keepalive_pings_are_within_what_the_servers_allow():
    # A client pinging more often than the server tolerates gets GOAWAY too_many_pings and
    # loses its idle channel; jitter makes pings early, hence the margin.
    assert KEEPALIVE_TIME_MS >= 1.5 * MIN_CLIENT_PING_INTERVAL_MS

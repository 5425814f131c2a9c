"""`nemotron-speech stack` and `health`: docker driven through a recording test double,
status against real servers and against servers that are down."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

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
from tests.servers import free_port, running

ROOT = Path(__file__).resolve().parent.parent
FAKE_DOCKER = ROOT / "tests" / "fake_docker"


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nemotron_speech",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def docker_log(tmp_path: Path) -> Path:
    return tmp_path / "docker.jsonl"


def fake_env(log: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{FAKE_DOCKER}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DOCKER_LOG": str(log),
        **extra,
    }


def calls(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def compose_args(call: dict[str, object]) -> list[str]:
    argv = call["argv"]
    assert isinstance(argv, list)
    assert argv[:2] == ["compose", "-f"] and argv[2].endswith("deploy/compose.yaml")
    assert argv[3:5] == ["-p", "nemotron-speech"]
    return argv[5:]


async def test_start_cpu_without_tts(docker_log):
    code, out, _ = await cli(
        "stack", "start", "--profile", "cpu", "--no-tts", env=fake_env(docker_log)
    )
    assert code == 0, out
    (call,) = calls(docker_log)
    assert compose_args(call) == [
        "--profile",
        "cpu",
        "up",
        "--detach",
        "--wait",
        "asr",
        "llm",
        "jaeger",
    ]


async def test_start_gpu_llamacpp_q4_with_a_model_file(docker_log, tmp_path):
    model = tmp_path / "my-nano.gguf"
    model.write_bytes(b"GGUF")
    code, _, err = await cli(
        "stack",
        "start",
        "--profile",
        "gpu",
        "--mode",
        "llamacpp-q4",
        "--model",
        str(model),
        env=fake_env(docker_log),
    )
    assert code == 0, err
    (call,) = calls(docker_log)
    assert compose_args(call) == [
        "--profile",
        "gpu",
        "up",
        "--detach",
        "--wait",
        "speech-gpu",
        "bot-gpu",
        "jaeger",
    ]
    env = call["env"]
    assert isinstance(env, dict)
    assert env["MODELS_DIR"] == str(tmp_path)
    assert env["NEMOTRON_LLM_MODEL"] == "/models/my-nano.gguf"
    assert env["NEMOTRON_LLM_BACKEND"] == "llama_cpp"
    assert env["NEMOTRON_STAGES"] == "asr tts llm"


def cache_nano(hf_home: Path, filename: str) -> None:
    """Nemotron-3-Nano's GGUF in a Hugging Face home, laid out as huggingface_hub does."""
    repo = hf_home / "hub" / "models--unsloth--Nemotron-3-Nano-30B-A3B-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee" / filename).write_bytes(b"GGUF")


async def test_start_gpu_llamacpp_finds_nemotron_nano_in_the_hf_cache_by_default(
    docker_log, tmp_path
):
    hf_home = tmp_path / "hf"
    cache_nano(hf_home, "Nemotron-3-Nano-30B-A3B-Q8_0.gguf")
    # Empty variables as in deploy/.env.example: the default, whatever this shell has.
    env = fake_env(docker_log, HF_CACHE=str(hf_home), LLM_GGUF_Q8="", LLM_GGUF_Q4="")
    code, _, err = await cli("stack", "start", "--profile", "gpu", env=env)
    assert code == 0, err
    assert "not in the Hugging Face cache" not in err
    code, _, err = await cli("stack", "start", "--profile", "gpu", "--mode", "llamacpp-q4", env=env)
    assert code == 0, err
    q8, q4 = (c["env"] for c in calls(docker_log))
    assert isinstance(q8, dict) and isinstance(q4, dict)
    assert q8["NEMOTRON_LLM_MODEL"] == "hf:unsloth/Nemotron-3-Nano-30B-A3B-GGUF/Q8_0"
    assert q4["NEMOTRON_LLM_MODEL"] == "hf:unsloth/Nemotron-3-Nano-30B-A3B-GGUF/Q4_K_M"
    assert q4["NEMOTRON_LLM_BACKEND"] == "llama_cpp"
    # Only Q8_0 is cached: starting Q4 says that the server will download it, and how to first.
    repo = hf_home / "hub" / "models--unsloth--Nemotron-3-Nano-30B-A3B-GGUF"
    assert f"not in the Hugging Face cache at {repo}" in err
    assert (
        "hf download unsloth/Nemotron-3-Nano-30B-A3B-GGUF --include '*[Qq]4_[Kk]_[Mm]*.gguf'" in err
    )


async def test_start_gpu_llamacpp_keeps_an_explicit_file_or_reference(docker_log, tmp_path):
    env = fake_env(docker_log, HF_CACHE=str(tmp_path), LLM_GGUF_Q4="my-nano-q4.gguf")
    code, _, err = await cli("stack", "start", "--profile", "gpu", "--mode", "llamacpp-q4", env=env)
    assert code == 0, err
    reference = "hf:acme/Other-GGUF:other-Q6_K.gguf"
    code, _, err = await cli("stack", "start", "--profile", "gpu", "--model", reference, env=env)
    assert code == 0, err
    from_env, from_flag = (c["env"] for c in calls(docker_log))
    assert isinstance(from_env, dict) and isinstance(from_flag, dict)
    assert from_env["NEMOTRON_LLM_MODEL"] == "/models/my-nano-q4.gguf"
    assert from_flag["NEMOTRON_LLM_MODEL"] == reference
    code, _, err = await cli("stack", "start", "--profile", "gpu", "--model", "hf:acme", env=env)
    assert code == 2 and "hf:ORG/REPO/QUANT" in err


async def test_start_cpu_with_every_stage_adds_the_bot_unless_told_not_to(docker_log):
    code, out, _ = await cli("stack", "start", "--profile", "cpu", env=fake_env(docker_log))
    assert code == 0, out
    code, out, _ = await cli(
        "stack", "start", "--profile", "cpu", "--no-bot", env=fake_env(docker_log)
    )
    assert code == 0, out
    with_bot, without_bot = calls(docker_log)
    assert compose_args(with_bot)[-5:] == ["asr", "tts", "llm", "bot", "jaeger"]
    assert compose_args(without_bot)[-4:] == ["asr", "tts", "llm", "jaeger"]


async def test_start_gpu_vllm_adds_the_vllm_profile(docker_log):
    code, _, err = await cli(
        "stack", "start", "--profile", "gpu", "--mode", "vllm", "--no-asr", env=fake_env(docker_log)
    )
    assert code == 0, err
    (call,) = calls(docker_log)
    assert compose_args(call) == [
        "--profile",
        "gpu",
        "--profile",
        "vllm",
        "up",
        "--detach",
        "--wait",
        "speech-gpu",
        "vllm",
        "jaeger",
    ]
    env = call["env"]
    assert isinstance(env, dict)
    assert env["NEMOTRON_LLM_BACKEND"] == "openai_upstream"
    assert env["NEMOTRON_STAGES"] == "tts llm"


async def test_start_follows_logs_with_f(docker_log):
    code, _, _ = await cli("stack", "start", "--profile", "cpu", "-f", env=fake_env(docker_log))
    assert code == 0
    assert [compose_args(c)[-2:] for c in calls(docker_log)] == [["bot", "jaeger"], ["logs", "-f"]]


async def test_stop_restart_logs_and_shell(docker_log):
    env = fake_env(docker_log, FAKE_DOCKER_PS="speech-gpu\njaeger")
    for args in (["stop"], ["restart", "--profile", "cpu"], ["logs", "tts"], ["shell"]):
        code, _, err = await cli("stack", *args, env=env)
        assert code == 0, err
    recorded = [compose_args(c) for c in calls(docker_log)]
    profiles = ["--profile", "cpu", "--profile", "gpu", "--profile", "vllm"]
    assert recorded[0] == [*profiles, "down"]
    assert recorded[1] == [*profiles, "down"]
    assert recorded[2][:3] == ["--profile", "cpu", "up"]
    assert recorded[3] == [*profiles, "logs", "-f", "tts"]
    assert recorded[4] == ["ps", "--services"]
    assert recorded[5] == ["exec", "speech-gpu", "/bin/bash"]


async def test_a_failing_compose_is_reported(docker_log):
    code, _, _ = await cli(
        "stack", "start", "--profile", "cpu", env=fake_env(docker_log, FAKE_DOCKER_EXIT="17")
    )
    assert code == 17


async def test_start_without_docker_explains(tmp_path):
    code, _, err = await cli("stack", "start", "--profile", "cpu", env={"PATH": str(tmp_path)})
    assert code == 2 and "docker is not installed" in err


async def test_status_and_health_against_real_servers():
    asr = AsrService(AsrSettings(port=0), CountingAsrBackendDouble())
    tts = TtsService(TtsSettings(port=0), ToneTtsBackendDouble())
    llm = LlmService(LlmSettings(port=0, max_streams=3), ScriptedLlmBackendDouble(REPLY))
    async with running(asr) as a, running(tts) as t, running(llm) as m:
        env = {
            "NVIDIA_ASR_URL": f"127.0.0.1:{a.port}",
            "NVIDIA_TTS_URL": f"127.0.0.1:{t.port}",
            "NVIDIA_LLM_URL": f"127.0.0.1:{m.port}",
        }
        code, out, err = await cli("stack", "status", env=env)
        assert code == 0, out + err
        lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
        assert lines["asr"][2:5] == ["SERVING", "double", "counting-double"]
        assert lines["llm"][2:] == ["SERVING", "double", "scripted-double", "0/3"]
        code, _, _ = await cli("health", "--quiet", "asr", "tts", env=env)
        assert code == 0


async def test_status_and_health_report_servers_that_are_down():
    env = {
        "NVIDIA_ASR_URL": f"127.0.0.1:{free_port()}",
        "NVIDIA_TTS_URL": f"127.0.0.1:{free_port()}",
        "NVIDIA_LLM_URL": f"127.0.0.1:{free_port()}",
    }
    code, out, _ = await cli("stack", "status", "--timeout", "0.5", env=env)
    assert code == 1
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["DOWN"] * 3
    code, _, _ = await cli("health", "--quiet", "--timeout", "0.5", "llm", env=env)
    assert code == 1

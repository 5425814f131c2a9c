"""`nemotron-speech stack ...`: drive the docker compose stack, and report what is running.

`start`, `stop`, `restart`, `logs` and `shell` drive `docker compose` with deploy/compose.yaml.
`status` asks each server directly over gRPC (health and ServerInfoService), so it works the same
for the compose stack, for servers started by hand, and with no Docker at all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from clients.targets import target_of
from nemotron_speech.probe import format_table, probe_all

PROJECT = "nemotron-speech"
STAGES = ("asr", "tts", "llm")
GPU_SERVICE = "speech-gpu"  # the one GPU container that runs all three servers
#: The voice bot's service in each profile (deploy/compose.yaml).
BOT_SERVICES = {"cpu": "bot", "gpu": "bot-gpu"}
ALL_PROFILES = ("--profile", "cpu", "--profile", "gpu", "--profile", "vllm")


@dataclass(frozen=True)
class LlmMode:
    """How the GPU profile runs the LLM."""

    backend: str
    model_variable: str  # the deploy/.env variable naming the model
    default_model: str
    profiles: tuple[str, ...] = ()


LLM_MODES = {
    "llamacpp-q8": LlmMode("llama_cpp", "LLM_GGUF_Q8", "nemotron-3-nano-q8_0.gguf"),
    "llamacpp-q4": LlmMode("llama_cpp", "LLM_GGUF_Q4", "nemotron-3-nano-q4_k_m.gguf"),
    "vllm": LlmMode("openai_upstream", "VLLM_MODEL", "/models/nemotron-3-nano", ("vllm",)),
}


def add_stack_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `stack start|stop|restart|status|logs|shell`."""
    stack = subparsers.add_parser("stack", help="run the docker compose stack and inspect it")
    actions = stack.add_subparsers(dest="action", required=True)
    for name in ("start", "restart"):
        parser = actions.add_parser(name, help=f"{name} the stack (docker compose up)")
        parser.add_argument(
            "--profile",
            choices=("auto", "gpu", "cpu"),
            default="auto",
            help="gpu: one GPU container with NeMo and llama.cpp/vLLM; cpu: the "
            "embedded CPU models; auto: gpu when nvidia-smi is found",
        )
        parser.add_argument(
            "--mode",
            choices=sorted(LLM_MODES),
            default="llamacpp-q8",
            help="how the GPU profile runs the LLM",
        )
        parser.add_argument(
            "--model", type=Path, help="LLM model file on this machine (mounted into the container)"
        )
        for stage in STAGES:
            parser.add_argument(f"--no-{stage}", action="store_true", help=f"leave out {stage}")
        parser.add_argument(
            "--no-bot",
            action="store_true",
            help="leave out the voice bot (it runs only with all three stages)",
        )
        parser.add_argument(
            "-f", "--follow", action="store_true", help="follow the logs after starting"
        )
    actions.add_parser("stop", help="stop and remove the stack's containers")
    status = actions.add_parser("status", help="each server's health, backend and model")
    status.add_argument("--host", default="127.0.0.1", help="where the servers' ports are")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds per server")
    logs = actions.add_parser("logs", help="follow the logs of one service or all")
    logs.add_argument(
        "service", nargs="?", choices=(*STAGES, "bot", "bot-gpu", "jaeger", "vllm", GPU_SERVICE)
    )
    shell = actions.add_parser("shell", help="a shell in a running service container")
    shell.add_argument("service", nargs="?", default="", choices=("", *STAGES, GPU_SERVICE))


def run_stack(args: argparse.Namespace) -> int:
    """Carry out `args.action`; returns the exit code."""
    if args.action == "status":
        return asyncio.run(_status(args.host, args.timeout))
    compose_file = compose_file_path()
    compose = _compose_base(compose_file)
    if compose is None or compose_file is None:
        return 2
    if args.action == "stop":
        return _run([*compose, *ALL_PROFILES, "down"])
    if args.action in ("start", "restart"):
        if args.action == "restart":
            code = _run([*compose, *ALL_PROFILES, "down"])
            if code:
                return code
        return _start(compose, compose_file, args)
    if args.action == "logs":
        return _run(
            [*compose, *ALL_PROFILES, "logs", "-f", *([args.service] if args.service else [])]
        )
    if args.action == "shell":
        service = args.service or _running_default(compose)
        return _run([*compose, "exec", service, "/bin/bash"])
    raise AssertionError(args.action)


def _start(compose: list[str], compose_file: Path, args: argparse.Namespace) -> int:
    profile = args.profile
    if profile == "auto":
        profile = "gpu" if shutil.which("nvidia-smi") else "cpu"
    stages = [s for s in STAGES if not getattr(args, f"no_{s}")]
    if not stages:
        print("nothing to start: every stage was left out", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["NEMOTRON_STAGES"] = " ".join(stages)
    profiles = [profile]
    if profile == "gpu":
        mode = LLM_MODES[args.mode]
        # Values from deploy/.env, overridden by this shell's environment, as compose does.
        settings = {**dotenv_values(compose_file.parent / ".env"), **os.environ}
        model = settings.get(mode.model_variable) or mode.default_model
        env.update(LLM_MODE=args.mode, NEMOTRON_LLM_BACKEND=mode.backend, VLLM_MODEL=model)
        if mode.backend == "llama_cpp":
            env["NEMOTRON_LLM_MODEL"] = f"/models/{model}"
        profiles += mode.profiles
    if args.model is not None:
        model_path = args.model.expanduser().resolve()
        if not model_path.is_file():
            print(f"--model {args.model}: no such file", file=sys.stderr)
            return 2
        env["MODELS_DIR"] = str(model_path.parent)
        env["NEMOTRON_LLM_MODEL"] = f"/models/{model_path.name}"
    services = [GPU_SERVICE, *profiles[1:]] if profile == "gpu" else list(stages)
    if len(stages) == len(STAGES) and not args.no_bot:
        services.append(BOT_SERVICES[profile])
    selected = [flag for name in profiles for flag in ("--profile", name)]
    code = _run([*compose, *selected, "up", "--detach", "--wait", *services, "jaeger"], env=env)
    if code == 0:
        print(
            f"stack up ({' + '.join(profiles)}); `nemotron-speech stack status` shows each server"
        )
        if args.follow:
            return _run([*compose, *selected, "logs", "-f"], env=env)
    return code


async def _status(host: str, timeout_s: float) -> int:
    statuses = await probe_all({s: target_of(s, host) for s in STAGES}, timeout_s)
    print(format_table(statuses))
    return 0 if all(s.serving for s in statuses) else 1


def _compose_base(compose_file: Path | None) -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        print(
            "docker is not installed (the stack needs Docker with the compose plugin); "
            "without Docker, use `nemotron-speech up`",
            file=sys.stderr,
        )
        return None
    if compose_file is None:
        print(
            "deploy/compose.yaml not found; run from the repository, or set NEMOTRON_COMPOSE_FILE",
            file=sys.stderr,
        )
        return None
    return [docker, "compose", "-f", str(compose_file), "-p", PROJECT]


def compose_file_path() -> Path | None:
    """NEMOTRON_COMPOSE_FILE, else deploy/compose.yaml above the working or source directory."""
    if explicit := os.environ.get("NEMOTRON_COMPOSE_FILE"):
        return Path(explicit)
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "deploy" / "compose.yaml"
            if candidate.is_file():
                return candidate
    return None


def _running_default(compose: list[str]) -> str:
    done = subprocess.run(
        [*compose, "ps", "--services"], capture_output=True, text=True, check=False
    )
    running = done.stdout.split()
    return GPU_SERVICE if GPU_SERVICE in running else (running[0] if running else "asr")


def _run(argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    return subprocess.run(list(argv), env=env, check=False).returncode

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

from clients.security import (
    ClientSecurity,
    ClientSecurityError,
    add_security_flags,
    security_from_args,
)
from clients.targets import target_of
from nemotron_speech.probe import format_table, probe_all
from services.llm.backends.model_source import (
    HF_PREFIX,
    HfReference,
    fetch_command,
    find_in_cache,
    repo_cache,
)

PROJECT = "nemotron-speech"
STAGES = ("asr", "tts", "llm")
GPU_SERVICE = "speech-gpu"  # the one GPU container that runs all three servers
#: The voice bot's service in each profile (deploy/compose.yaml).
BOT_SERVICES = {"cpu": "bot", "gpu": "bot-gpu"}
ALL_PROFILES = ("--profile", "cpu", "--profile", "gpu", "--profile", "vllm")
#: Nemotron-3-Nano as GGUF; the LLM server finds a quantisation of it in the Hugging Face cache.
NANO_GGUF = "hf:unsloth/Nemotron-3-Nano-30B-A3B-GGUF"
#: Where compose mounts the host's Hugging Face home (deploy/compose.yaml, HF_CACHE).
DEFAULT_HF_CACHE = "~/.cache/huggingface"


@dataclass(frozen=True)
class LlmMode:
    """How the GPU profile runs the LLM."""

    backend: str
    model_variable: str  # the deploy/.env variable naming the model (a file or an hf: reference)
    default_model: str  # used when that variable is empty
    profiles: tuple[str, ...] = ()


LLM_MODES = {
    "llamacpp-q8": LlmMode("llama_cpp", "LLM_GGUF_Q8", f"{NANO_GGUF}/Q8_0"),
    "llamacpp-q4": LlmMode("llama_cpp", "LLM_GGUF_Q4", f"{NANO_GGUF}/Q4_K_M"),
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
            "--model",
            help="LLM model: a file on this machine (mounted into the container) or a Hugging "
            "Face reference, hf:ORG/REPO/QUANT or hf:ORG/REPO:FILE.gguf (default for llamacpp-*: "
            f"{NANO_GGUF}/Q8_0 or /Q4_K_M, from the Hugging Face cache)",
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
    add_security_flags(status)
    logs = actions.add_parser("logs", help="follow the logs of one service or all")
    logs.add_argument(
        "service", nargs="?", choices=(*STAGES, "bot", "bot-gpu", "jaeger", "vllm", GPU_SERVICE)
    )
    shell = actions.add_parser("shell", help="a shell in a running service container")
    shell.add_argument("service", nargs="?", default="", choices=("", *STAGES, GPU_SERVICE))


def run_stack(args: argparse.Namespace) -> int:
    """Carry out `args.action`; returns the exit code."""
    if args.action == "status":
        try:
            security = security_from_args(args)
        except ClientSecurityError as err:
            print(f"nemotron-speech stack status: {err}", file=sys.stderr)
            return 2
        return asyncio.run(_status(args.host, args.timeout, security))
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
    # Values from deploy/.env, overridden by this shell's environment, as compose does.
    settings = {**dotenv_values(compose_file.parent / ".env"), **os.environ}
    if profile == "gpu":
        mode = LLM_MODES[args.mode]
        model = settings.get(mode.model_variable) or mode.default_model
        env.update(LLM_MODE=args.mode, NEMOTRON_LLM_BACKEND=mode.backend, VLLM_MODEL=model)
        if mode.backend == "llama_cpp":
            # A file name is under MODELS_DIR; a reference is found in the mounted HF cache.
            env["NEMOTRON_LLM_MODEL"] = model if model.startswith(HF_PREFIX) else f"/models/{model}"
        profiles += mode.profiles
    if args.model is not None and args.model.startswith(HF_PREFIX):
        env["NEMOTRON_LLM_MODEL"] = args.model
    elif args.model is not None:
        model_path = Path(args.model).expanduser().resolve()
        if not model_path.is_file():
            print(f"--model {args.model}: no such file", file=sys.stderr)
            return 2
        env["MODELS_DIR"] = str(model_path.parent)
        env["NEMOTRON_LLM_MODEL"] = f"/models/{model_path.name}"
    if profile == "gpu" and env.get("NEMOTRON_LLM_MODEL", "").startswith(HF_PREFIX):
        hf_home = Path(settings.get("HF_CACHE") or DEFAULT_HF_CACHE).expanduser()
        try:
            _note_if_not_cached(env["NEMOTRON_LLM_MODEL"], compose_file.parent / hf_home / "hub")
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
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


def _note_if_not_cached(model: str, hub_cache: Path) -> None:
    """Warn, before compose waits on the health check, that the first start downloads the model.

    The server downloads a missing model into the mounted cache before it loads; tens of GB can
    outlast the health check's start period, so say so and how to fetch it beforehand.
    """
    ref = HfReference.parse(model)
    if find_in_cache(ref, hub_cache) is not None:
        return
    print(
        f"note: {ref} is not in the Hugging Face cache at {repo_cache(ref.repo_id, hub_cache)}; "
        "the LLM server downloads it on its first start (HF_TOKEN from deploy/.env), which may "
        f"take longer than the health check waits. To fetch it first:\n"
        f"  {fetch_command(ref, hub_cache)}",
        file=sys.stderr,
    )


async def _status(host: str, timeout_s: float, security: ClientSecurity) -> int:
    statuses = await probe_all({s: target_of(s, host) for s in STAGES}, timeout_s, security)
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

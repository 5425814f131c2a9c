"""`nemotron-speech up`: the three servers and a bot, from clone to talking in one command.

Starts the ASR, TTS and LLM servers (embedded CPU backends unless flags or NEMOTRON_* variables
choose others) as child processes, waits until every one reports SERVING, then starts the bot
with the servers' addresses and prints where to open the browser. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

import httpx

from bots.names import BOTS, DEFAULT_BOT
from clients.targets import DEFAULT_PORTS, TARGET_ENV
from nemotron_speech.stack import STAGES
from nemotron_speech.supervisor import Supervisor, serve_argv

log = logging.getLogger(__name__)


def add_up_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`up` and its flags."""
    up = subparsers.add_parser(
        "up",
        help="start the three servers and a voice bot, then open http://localhost:7860/client",
    )
    up.add_argument("--bot", default=DEFAULT_BOT, choices=BOTS, help="which bot to run")
    up.add_argument("--no-bot", action="store_true", help="servers only (for load tests)")
    up.add_argument("--bot-port", type=int, default=7860, help="the bot's web port")
    up.add_argument("--asr-backend", help="ASR engine (default: $NEMOTRON_ASR_BACKEND or whisper)")
    up.add_argument("--tts-backend", help="TTS engine (default: $NEMOTRON_TTS_BACKEND or piper)")
    up.add_argument(
        "--llm-backend", help="LLM engine (default: $NEMOTRON_LLM_BACKEND or llama_cpp)"
    )
    up.add_argument(
        "--vllm-url",
        default=os.environ.get("VLLM_URL", "http://127.0.0.1:8008/v1"),
        help="vLLM's OpenAI-compatible endpoint for --bot vllm (default: $VLLM_URL)",
    )
    up.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds the models get to load"
    )


def server_flags(args: argparse.Namespace, stage: str) -> list[str]:
    """The `serve` flags for one stage, from `up`'s flags."""
    flags = ["--port", str(DEFAULT_PORTS[stage])]
    backend = getattr(args, f"{stage}_backend")
    if stage == "llm" and args.bot == "vllm" and not args.no_bot:
        backend = backend or "openai_upstream"
        flags += ["--upstream-url", args.vllm_url]
    if backend:
        flags += ["--backend", backend]
    return flags


def run_up(args: argparse.Namespace) -> int:
    """Entry point of `nemotron-speech up`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    return asyncio.run(_up(args))


async def _up(args: argparse.Namespace) -> int:
    supervisor = Supervisor()
    targets = {stage: f"127.0.0.1:{DEFAULT_PORTS[stage]}" for stage in STAGES}
    try:
        for stage in STAGES:
            await supervisor.start(stage, serve_argv(stage, server_flags(args, stage)))
        await supervisor.wait_serving(targets, args.ready_timeout)
        if not args.no_bot:
            env = {**os.environ, **{TARGET_ENV[s]: t for s, t in targets.items()}}
            bot = [sys.executable, "-m", "nemotron_speech", "bot", args.bot]
            await supervisor.start("bot", [*bot, "--port", str(args.bot_port)], env=env)
            url = f"http://localhost:{args.bot_port}/client"
            await _wait_http(url, supervisor, timeout_s=120.0)
            print(f"\n  Talk to the {args.bot} bot: open {url}  (Ctrl-C stops everything)\n")
        else:
            print("\n  Servers up: " + ", ".join(f"{s} {t}" for s, t in targets.items()) + "\n")
    except (RuntimeError, TimeoutError) as err:
        log.error("%s", err)
        await supervisor.stop()
        return 1
    return await supervisor.run()


async def _wait_http(url: str, supervisor: Supervisor, timeout_s: float) -> None:
    """Wait until `url` answers; fail early if a child exits."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            supervisor.check_alive()
            try:
                if (await client.get(url, follow_redirects=True)).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bot did not answer at {url} within {timeout_s:g} s")
            await asyncio.sleep(0.5)

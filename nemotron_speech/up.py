"""`nemotron-speech up`: the three servers and a bot, from clone to talking in one command.

Starts the ASR, TTS and LLM servers (embedded CPU backends unless flags or NEMOTRON_* variables
choose others) as child processes, waits until every one reports SERVING, then starts the bot
with the servers' addresses and prints where to open the browser. Ctrl-C stops everything.

With `--tls-cert/--tls-key` (and `--tls-client-ca`) the servers speak TLS (mutual TLS), and with
`--token-file` they want its tokens; the bot and the readiness checks dial them with `--tls-ca`
(and `--tls-client-cert/--tls-client-key`) and the file's first token. Everything reaches the
children as the documented NEMOTRON_* variables, never a token on a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

import httpx

from bots.names import BOTS, DEFAULT_BOT
from clients.security import ClientSecurity, ClientSecurityError, add_security_flags
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
    servers = up.add_argument_group("server security", "TLS of the servers (default: env)")
    servers.add_argument("--tls-cert", type=Path, help="the servers' certificate: turns TLS on")
    servers.add_argument("--tls-key", type=Path, help="the key of --tls-cert")
    servers.add_argument(
        "--tls-client-ca", type=Path, help="CA of accepted client certificates: mutual TLS"
    )
    # --token-file is both sides': the servers accept its tokens, the bot sends the first.
    add_security_flags(up)


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


#: `up`'s security flags and the variables they become for the servers and the bot.
SECURITY_ENV = {
    "tls_cert": "NEMOTRON_TLS_CERT",
    "tls_key": "NEMOTRON_TLS_KEY",
    "tls_client_ca": "NEMOTRON_TLS_CLIENT_CA",
    "token_file": "NEMOTRON_TOKEN_FILE",
    "tls_ca": "NEMOTRON_TLS_CA",
    "tls_client_cert": "NEMOTRON_TLS_CLIENT_CERT",
    "tls_client_key": "NEMOTRON_TLS_CLIENT_KEY",
    "tls_server_name": "NEMOTRON_TLS_SERVER_NAME",
}


def security_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of the children: ours, with `up`'s security flags laid over it."""
    env = dict(os.environ)
    for flag, variable in SECURITY_ENV.items():
        value = getattr(args, flag)
        if value is not None:
            env[variable] = str(value.resolve()) if isinstance(value, Path) else value
    if args.tls:
        env["NEMOTRON_TLS"] = "true"
    if env.get("NEMOTRON_TLS_CERT") and not (env.get("NEMOTRON_TLS_CA") or args.tls):
        raise ClientSecurityError(
            "the servers speak TLS (--tls-cert), so the bot needs the CA that signed their "
            "certificate: --tls-ca (for a self-signed certificate, the certificate itself)"
        )
    return env


def run_up(args: argparse.Namespace) -> int:
    """Entry point of `nemotron-speech up`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    try:
        env = security_env(args)
        security = ClientSecurity.from_env(env)
    except ClientSecurityError as err:
        print(f"nemotron-speech up: {err}", file=sys.stderr)
        return 2
    return asyncio.run(_up(args, env, security))


async def _up(args: argparse.Namespace, env: dict[str, str], security: ClientSecurity) -> int:
    supervisor = Supervisor()
    targets = {stage: f"127.0.0.1:{DEFAULT_PORTS[stage]}" for stage in STAGES}
    try:
        for stage in STAGES:
            await supervisor.start(stage, serve_argv(stage, server_flags(args, stage)), env=env)
        await supervisor.wait_serving(targets, args.ready_timeout, security)
        if not args.no_bot:
            env = {**env, **{TARGET_ENV[s]: t for s, t in targets.items()}}
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

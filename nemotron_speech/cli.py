"""`nemotron-speech`: one command for the servers, the stack and, as they land, bots and tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from bots.names import BOTS
from clients.security import (
    ClientSecurity,
    ClientSecurityError,
    add_security_flags,
    security_from_args,
)
from clients.targets import target_of
from nemotron_speech.probe import format_table, probe_all
from nemotron_speech.stack import STAGES, add_stack_parser, run_stack
from nemotron_speech.supervisor import Supervisor, serve_argv
from nemotron_speech.trace_report import add_trace_report_parser, run_trace_report
from nemotron_speech.up import add_up_parser, run_up
from services.serve import add_serve_parser, run_serve


def build_parser() -> argparse.ArgumentParser:
    """The full command tree."""
    parser = argparse.ArgumentParser(
        prog="nemotron-speech",
        description="Private, local voice agents over typed gRPC (ASR, LLM, TTS).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    serve_all = subparsers.add_parser(
        "serve-all", help="run several servers as child processes (the GPU container's command)"
    )
    serve_all.add_argument(
        "stages",
        nargs="*",
        metavar="STAGE",
        help="asr, tts and/or llm (default: $NEMOTRON_STAGES, else all three)",
    )
    serve_all.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds the models get to load before giving up",
    )
    health = subparsers.add_parser(
        "health", help="exit 0 when the named servers report SERVING (for healthchecks)"
    )
    health.add_argument(
        "stages",
        nargs="*",
        metavar="STAGE",
        help="asr, tts and/or llm (default: $NEMOTRON_STAGES, else all three)",
    )
    health.add_argument("--host", default="127.0.0.1")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds per server")
    health.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    add_security_flags(health)
    add_stack_parser(subparsers)
    add_trace_report_parser(subparsers)
    bot = subparsers.add_parser(
        "bot",
        help="serve a voice bot (browser client at http://localhost:7860/client)",
        description="Serve a voice bot over the running ASR, TTS and LLM servers "
        "(NVIDIA_ASR_URL, NVIDIA_TTS_URL, NVIDIA_LLM_URL). Flags after the name go to "
        "Pipecat's runner (-t daily, --host, --port ...), except the turn-taking flags "
        "(--vad-stop-s, --barge-in-min-words, --echo-cancellation ...; each also "
        "NEMOTRON_BOT_<NAME>), which the bot takes: see `python -m bots.turn_settings`.",
    )
    bot.add_argument("name", nargs="?", default="interleaved_streaming", choices=BOTS)
    bot.add_argument("runner_args", nargs=argparse.REMAINDER, help="flags for Pipecat's runner")
    add_up_parser(subparsers)
    talk = subparsers.add_parser(
        "talk",
        help="one turn from a WAV file through the real pipeline; prints each stage's TTFB",
    )
    talk.add_argument("--in", dest="question", type=Path, required=True, help="question WAV")
    talk.add_argument("--out", dest="reply", type=Path, required=True, help="reply WAV to write")
    talk.add_argument("--bot", default="simple_vad", choices=BOTS, help="pipeline to use")
    talk.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    add_security_flags(talk)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "serve-all":
        return asyncio.run(_serve_all(_stages(args.stages), args.ready_timeout))
    if args.command == "health":
        security = _security(args)
        return asyncio.run(
            _health(_stages(args.stages), args.host, args.timeout, args.quiet, security)
        )
    if args.command == "stack":
        return run_stack(args)
    if args.command == "trace-report":
        return run_trace_report(args)
    if args.command == "up":
        return run_up(args)
    if args.command == "talk":
        from bots.talk import talk as talk_once

        if not args.question.is_file():
            raise SystemExit(f"no such WAV file: {args.question}")
        security = _security(args)
        return asyncio.run(talk_once(args.question, args.reply, args.bot, args.timeout, security))
    if args.command == "bot":
        from bots.runner import main as run_bot  # imports Pipecat: only when asked for

        run_bot(args.name, args.runner_args)
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def _stages(given: list[str]) -> list[str]:
    stages = given or os.environ.get("NEMOTRON_STAGES", "").split() or list(STAGES)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s): {', '.join(sorted(unknown))}; use asr, tts, llm")
    return stages


def _security(args: argparse.Namespace) -> ClientSecurity:
    """The client security the flags and NEMOTRON_TLS_*/NEMOTRON_TOKEN* variables give."""
    try:
        return security_from_args(args)
    except ClientSecurityError as err:
        raise SystemExit(f"nemotron-speech {args.command}: {err}") from None


async def _health(
    stages: list[str], host: str, timeout_s: float, quiet: bool, security: ClientSecurity
) -> int:
    targets = {s: target_of(s, host) for s in stages}
    statuses = await probe_all(targets, timeout_s, security)
    if not quiet:
        print(format_table(statuses))
    return 0 if all(s.serving for s in statuses) else 1


async def _serve_all(stages: list[str], ready_timeout_s: float) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    supervisor = Supervisor()
    try:
        for stage in stages:
            await supervisor.start(stage, serve_argv(stage))
        await supervisor.wait_serving({s: target_of(s) for s in stages}, ready_timeout_s)
    except (RuntimeError, TimeoutError) as err:
        logging.getLogger(__name__).error("%s", err)
        await supervisor.stop()
        return 1
    return await supervisor.run()

"""`nemotron-speech`: one command for the servers and, as they land, bots and tools."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from services.serve import add_serve_parser, run_serve


def build_parser() -> argparse.ArgumentParser:
    """The full command tree."""
    parser = argparse.ArgumentParser(
        prog="nemotron-speech",
        description="Private, local voice agents over typed gRPC (ASR, LLM, TTS).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    raise AssertionError(f"unhandled command {args.command}")

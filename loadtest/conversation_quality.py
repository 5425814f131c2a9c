"""python -m loadtest quality: how well a bot takes turns, measured over scripted conversations.

Scripted users (the test set's voices, `loadtest.conversation_quality_scripts`) talk to a real bot
(`bots.<name>.CONFIG`, its pipeline from `bots.pipeline`) over a real-time loopback transport whose
microphone also hears the bot's played audio (`loadtest.conversation_quality_transport`), and
the scenarios of `loadtest.conversation_quality_runs` measure barge-in latency, false barge-ins
from the bot's own voice, backchannels that stop the bot, context accuracy after interruptions,
turn-end latency and premature turn ends. Prints a table and writes every measurement as JSON.

    python -m loadtest quality --bot interleaved_streaming --repetitions 10 --echo-minutes 10
    python -m loadtest quality --set barge_in_min_words=2 --set echo_cancellation=webrtc

Starts the CPU servers (`python -m services.asr|tts|llm`, their default models) unless --asr,
--tts and --llm name running ones (loopback only).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from loguru import logger

from bots.pipeline import BotConfig
from bots.tracing import configure_bot_tracing
from clients.serving import start_server, wait_serving
from clients.targets import Targets
from loadtest.conversation_quality_metrics import Measurements, figures, report, write_json
from loadtest.conversation_quality_runs import (
    Plan,
    backchannels,
    barge_ins,
    echo_run,
    paused_turns,
    storyteller,
)
from loadtest.conversation_quality_scripts import backchannel_voice, user_voice

SCENARIOS = ("barge-in", "backchannels", "echo", "pauses")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--bot", default="interleaved_streaming", help="bots.<name>.CONFIG")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a turn setting (TurnSettings) or a BotConfig field; repeatable",
    )
    parser.add_argument("--asr", help="running ASR target (default: start one)")
    parser.add_argument("--tts", help="running TTS target (default: start one)")
    parser.add_argument("--llm", help="running LLM target (default: start one)")
    parser.add_argument(
        "--reference-asr-model",
        default="",
        help="Whisper model of a second ASR server, started to transcribe the played audio for "
        "context accuracy ('base': the whisper-base extra; default: the bot's own ASR server)",
    )
    parser.add_argument(
        "--reference-asr", help="running ASR target that transcribes the played audio"
    )
    parser.add_argument(
        "--llm-threads",
        type=int,
        default=1,
        help="llama.cpp threads of a started LLM server (0: one per core). 1 by default: on a "
        "host shared with other work, llama.cpp's threads wait on each other at every token "
        "and replies stall",
    )
    parser.add_argument("--repetitions", type=int, default=10, help="per scenario (1-100)")
    parser.add_argument("--backchannels-per-reply", type=int, default=3)
    parser.add_argument(
        "--echo-minutes", type=float, default=10.0, help="bot speech per echo level"
    )
    parser.add_argument(
        "--echo-levels", default="-20,-10,none", help="echo levels in dB; none: no echo"
    )
    parser.add_argument("--echo-delay-ms", type=float, default=60.0, help="speaker -> mic delay")
    parser.add_argument(
        "--talk-echo-db",
        default="none",
        help="echo level during the barge-in, backchannel and pause scenarios",
    )
    parser.add_argument("--max-tokens", type=int, default=400, help="of the long replies")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"any of {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument("--log-level", default="WARNING", help="the bot's (Pipecat's) log level")
    parser.add_argument("--out", type=Path, default=Path("artifacts/conversation_quality.json"))
    return parser


def level(text: str) -> float | None:
    """An echo level flag value: dB, or none."""
    return None if text.strip().lower() == "none" else float(text)


def bot_config(bot: str, overrides: Sequence[str], targets: Targets) -> BotConfig:
    """`bots.<bot>.CONFIG` on `targets`, with `NAME=VALUE` overrides.

    A name of the bot's turn settings (`BotConfig.turn`, `bots.turn_settings.TurnSettings`) is
    set there, parsed and checked by it; any other name must be a field of `BotConfig`.
    """
    config: BotConfig = importlib.import_module(f"bots.{bot}").CONFIG
    config = dataclasses.replace(config, targets=targets, greeting=False)
    turn: Any = getattr(config, "turn", None)
    turn_names = {f.name for f in dataclasses.fields(turn)} if turn is not None else set()
    bot_names = {f.name for f in dataclasses.fields(config)}
    turn_env: dict[str, str] = {}
    changes: dict[str, Any] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise SystemExit(f"--set {item}: expected NAME=VALUE")
        if name in turn_names:
            from bots.turn_settings import env_name

            turn_env[env_name(name)] = value
        elif name in bot_names and name not in ("turn", "targets", "security"):
            changes[name] = _parse(name, value, getattr(config, name))
        else:
            known = ", ".join(sorted(turn_names | bot_names))
            raise SystemExit(f"--set {name}: not a setting of the bot; known: {known}")
    if turn_env:
        changes["turn"] = turn.with_environment(turn_env)
    return dataclasses.replace(config, **changes)


def _parse(name: str, text: str, like: object) -> object:
    try:
        if isinstance(like, bool):
            return text.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise SystemExit(f"--set {name}={text}: not a {type(like).__name__}") from None
    return text


def settings_of(config: BotConfig) -> dict[str, object]:
    """The turn-taking settings the run used, for the JSON."""
    turn = getattr(config, "turn", None)
    settings: dict[str, object] = dataclasses.asdict(turn) if turn is not None else {}
    for name in ("vad_stop_s", "smart_turn", "max_tokens", "adaptive_tts"):
        if hasattr(config, name):
            settings[name] = getattr(config, name)
    return settings


@asynccontextmanager
async def servers(args: argparse.Namespace) -> AsyncIterator[tuple[Targets, str]]:
    """The servers' targets, and the reference ASR's, starting what was not given.

    A CPU server for each of --asr/--tts/--llm not given; the reference ASR is --reference-asr,
    one started with --reference-asr-model, or the bot's own ASR server.
    """
    started: list[asyncio.subprocess.Process] = []
    targets: dict[str, str] = {}
    try:
        for service in ("asr", "tts", "llm"):
            given = getattr(args, service)
            if given:
                targets[service] = given
                continue
            extra = ["--threads", str(args.llm_threads)] if service == "llm" else []
            process, target = await start_server(f"services.{service}", extra)
            started.append(process)
            targets[service] = target
        targets["reference"] = args.reference_asr or targets["asr"]
        if args.reference_asr_model and not args.reference_asr:
            model = ["--model", args.reference_asr_model]
            process, targets["reference"] = await start_server("services.asr", model)
            started.append(process)
        for target in targets.values():
            await wait_serving(target, timeout_s=300)
        bots = Targets(asr=targets["asr"], tts=targets["tts"], llm=targets["llm"])
        yield bots, targets["reference"]
    finally:
        for process in started:
            if process.returncode is None:
                process.terminate()
        for process in started:
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


def cpu_model() -> str:
    """`lscpu`'s model name (the figures depend on it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line]
    return names[0] if names else platform.processor()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen scenarios; returns the JSON document (settings, figures, measurements)."""
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or not 1 <= args.repetitions <= 100:
        raise SystemExit(f"--scenarios: any of {', '.join(SCENARIOS)}; --repetitions: 1-100")
    started, load_before = time.monotonic(), os.getloadavg()
    m = Measurements()
    async with servers(args) as (targets, reference):
        config = bot_config(args.bot, args.set, targets)
        plan = Plan(
            config=storyteller(config, args.max_tokens),
            short_config=config,
            repetitions=args.repetitions,
            backchannels_per_reply=args.backchannels_per_reply,
            echo_levels=tuple(level(x) for x in args.echo_levels.split(",")),
            echo_s=60 * args.echo_minutes,
            echo_delay_s=args.echo_delay_ms / 1000,
            talk_echo_db=level(args.talk_echo_db),
        )

        def document(complete: bool) -> dict[str, Any]:
            return _document(args, config, scenarios, started, load_before, m, complete)

        if "barge-in" in scenarios:
            await barge_ins(plan, reference, m)
            _checkpoint(args.out, document(False), m)
        if "backchannels" in scenarios:
            await backchannels(plan, m)
            _checkpoint(args.out, document(False), m)
        if "pauses" in scenarios:
            await paused_turns(plan, m)
            _checkpoint(args.out, document(False), m)
        if "echo" in scenarios:
            for echo_db in plan.echo_levels:
                await echo_run(plan, echo_db, m)
                _checkpoint(args.out, document(False), m)
    return document(True)


def _checkpoint(path: Path, document: dict[str, Any], m: Measurements) -> None:
    """Write what the run has measured so far: a long run stopped early keeps its figures."""
    document.pop("measurements")
    write_json(path, document, m)


def _document(
    args: argparse.Namespace,
    config: BotConfig,
    scenarios: list[str],
    started: float,
    load_before: tuple[float, float, float],
    m: Measurements,
    complete: bool,
) -> dict[str, Any]:
    return {
        "complete": complete,
        "label": args.label,
        "bot": args.bot,
        "overrides": list(args.set),
        "settings": settings_of(config),
        "scenarios": scenarios,
        "repetitions": args.repetitions,
        "echo_minutes": args.echo_minutes,
        "echo_delay_ms": args.echo_delay_ms,
        "talk_echo_db": args.talk_echo_db,
        "user_voice": user_voice(),
        "backchannel_voice": backchannel_voice(),
        "reference_asr": args.reference_asr or args.reference_asr_model or "the bot's",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        # Other work on the host skews every figure: the load averages at the start and end.
        "load_average": [list(load_before), list(os.getloadavg())],
        "llm_threads": None if args.llm else args.llm_threads,
        "wall_s": round(time.monotonic() - started, 1),
        "figures": figures(m),
        "measurements": m,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m loadtest quality`."""
    args = build_parser().parse_args(argv)
    from loadtest.__main__ import check_loopback

    logger.remove()  # Pipecat logs every frame processor at DEBUG: keep the figures readable
    logger.add(sys.stderr, level=args.log_level)

    check_loopback(*(t for t in (args.asr, args.tts, args.llm, args.reference_asr) if t))
    # As in a bot process: OTEL_* turns spans on, NEMOTRON_TRACE_CONTENT=1 the bots' words in
    # the log (what the gate heard in each held turn), off by default.
    configure_bot_tracing()
    result = asyncio.run(run(args))
    m = result.pop("measurements")
    print()
    print(report(result["figures"]))
    write_json(args.out, result, m)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

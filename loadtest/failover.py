"""python -m loadtest failover: conversations through replicas, one killed and one drained.

Starts `--replicas` copies of each server, each on its own loopback address (127.0.0.2,
127.0.0.3, ...), holds `--callers` conversations through them with balanced targets
(`ipv4:127.0.0.2:P,127.0.0.3:P,...`: gRPC's round robin over the healthy replicas), kills the
busiest replica of one service (SIGKILL) and drains the busiest of another (SIGTERM: health
NOT_SERVING, its streams get the drain grace, then are cut), and reports:

- spread: the streams each replica held, sampled from its ServerInfo (mean and peak);
- turns lost: per conversation and disruption (the design allows at most one: the turn in flight);
- recovery: from each disruption until a conversation noticed its streams broken (after a kill,
  at its next read or write of the stream; a drain cuts them only after its grace), and from
  then until they were open again on another replica (the most of any conversation).

    python -m loadtest failover --replicas 3 --callers 3 --turns 6

The servers are `python -m services.{service}` with their default backends (`--serve` names
another command, `{service}` standing for asr, tts or llm).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from clients.channel import open_channel
from clients.security import ClientSecurity
from clients.serving import wait_serving
from clients.targets import Targets
from loadtest.conversation import Caller, CallerResult, CallPlan
from loadtest.stats import table
from nemotron.speech.v1 import info_pb2, info_pb2_grpc

SERVICES = ("asr", "tts", "llm")
PLAINTEXT = ClientSecurity()


@dataclass
class Replica:
    """One server process on its own loopback address."""

    service: str
    host: str
    port: int
    process: asyncio.subprocess.Process
    #: Streams it held at each sample, while it was up.
    samples: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        """host:port."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Disruption:
    """A replica killed or drained, and when (perf_counter())."""

    kind: str  # "kill" or "drain"
    replica: str  # service@address
    at: float


@dataclass
class FailoverResult:
    """What `report` prints and `write_json` writes."""

    callers: int
    turns: int
    turns_ok: int
    turns_lost: int
    conversations_ended: int
    #: service -> replica address -> (mean, peak) streams held.
    spread: dict[str, dict[str, tuple[float, int]]]
    #: One entry per disruption: what, conversations hit, turns lost, the most time any
    #: conversation took to notice the break (from the disruption) and to re-open (from then).
    disruptions: list[dict[str, object]]
    #: Most turns one conversation lost to one disruption.
    max_lost_per_hit: int
    errors: dict[str, int]
    #: Per conversation, each turn: seconds from the start to its finalize (or its failure),
    #: and its turn latency in ms or its error.
    timeline: list[list[tuple[float, str]]] = field(default_factory=list)


def free_port(host: str) -> int:
    """A port nothing listens on at `host` now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def start_replicas(
    serve: str, replicas: int, grace_s: float, max_streams: int, log_level: str = "WARNING"
) -> dict[str, list[Replica]]:
    """Start every replica and wait until each reports SERVING."""
    started: dict[str, list[Replica]] = {service: [] for service in SERVICES}
    try:
        for service in SERVICES:
            for index in range(replicas):
                host = f"127.0.0.{2 + index}"
                port = free_port(host)
                argv = [*shlex.split(serve.format(service=service)), "--host", host]
                argv += ["--port", str(port), "--shutdown-grace-s", str(grace_s)]
                argv += ["--max-streams", str(max_streams), "--log-level", log_level]
                process = await asyncio.create_subprocess_exec(*argv)
                started[service].append(Replica(service, host, port, process))
        everyone = [replica for group in started.values() for replica in group]
        await asyncio.gather(*(wait_serving(r.address, 300, security=PLAINTEXT) for r in everyone))
    except BaseException:  # none of those already started outlives a failed start
        await stop_replicas(started)
        raise
    return started


async def stop_replicas(replicas: dict[str, list[Replica]]) -> None:
    """SIGTERM every replica still running, SIGKILL after 15 s; all reaped."""
    for group in replicas.values():
        for replica in group:
            if replica.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    replica.process.terminate()
    for group in replicas.values():
        for replica in group:
            try:
                await asyncio.wait_for(replica.process.wait(), 15)
            except TimeoutError:
                replica.process.kill()
                await replica.process.wait()


def balanced_targets(replicas: dict[str, list[Replica]]) -> Targets:
    """One target per service naming all its replicas."""
    named = {s: "ipv4:" + ",".join(r.address for r in group) for s, group in replicas.items()}
    return Targets(asr=named["asr"], tts=named["tts"], llm=named["llm"])


async def sample_streams(replicas: dict[str, list[Replica]], every_s: float = 0.25) -> None:
    """Record each live replica's active streams until cancelled."""
    channels = {
        r.address + r.service: open_channel(r.address, PLAINTEXT, balanced=False)
        for group in replicas.values()
        for r in group
    }
    try:
        while True:
            for group in replicas.values():
                for replica in group:
                    if replica.process.returncode is not None:
                        continue
                    stub = info_pb2_grpc.ServerInfoServiceStub(
                        channels[replica.address + replica.service]
                    )
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        info = await stub.GetServerInfo(info_pb2.GetServerInfoRequest(), timeout=1)
                        replica.samples.append(info.active_streams)
            await asyncio.sleep(every_s)
    finally:
        for channel in channels.values():
            await channel.close()


def busiest(group: list[Replica], spare: Replica | None = None) -> Replica:
    """The live replica that held the most streams at the last sample."""
    live = [r for r in group if r.process.returncode is None and r is not spare]
    return max(live, key=lambda r: r.samples[-1] if r.samples else 0)


async def disrupt(
    replicas: dict[str, list[Replica]],
    kill: str,
    kill_at_s: float,
    drain: str,
    drain_at_s: float,
) -> list[Disruption]:
    """Kill the busiest `kill` replica at `kill_at_s`, drain the busiest `drain` one later."""
    started = time.perf_counter()
    done: list[Disruption] = []
    plan = sorted([(kill_at_s, "kill", kill), (drain_at_s, "drain", drain)])
    for at_s, kind, service in plan:
        await asyncio.sleep(max(0.0, started + at_s - time.perf_counter()))
        victim = busiest(replicas[service])
        victim.process.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        done.append(Disruption(kind, f"{service}@{victim.address}", time.perf_counter()))
        print(f"{at_s:5.1f} s: {kind} {service} replica at {victim.address}", flush=True)
    return done


def summarize(
    replicas: dict[str, list[Replica]],
    callers: list[CallerResult],
    disruptions: list[Disruption],
    turns: int,
    started: float,
) -> FailoverResult:
    """Spread, lost turns per disruption, recovery times."""
    spread = {
        service: {
            r.address: (statistics.fmean(r.samples or [0]), max(r.samples, default=0))
            for r in group
        }
        for service, group in replicas.items()
    }
    bounds = [d.at for d in disruptions] + [float("inf")]
    per_disruption: list[dict[str, object]] = []
    max_lost = 0
    for index, disruption in enumerate(disruptions):
        start, end = bounds[index], bounds[index + 1]
        hit, lost, detect_ms, reopen_ms = 0, 0, [], []
        for caller in callers:
            reopens = [r for r in caller.reopens if start <= r.broke_at < end]
            failed = [t for t in caller.turns if t.error and start <= t.failed_at < end]
            if reopens or failed:
                hit += 1
            lost += len(failed)
            max_lost = max(max_lost, len(failed))
            detect_ms += [1000 * (r.broke_at - start) for r in reopens]
            reopen_ms += [1000 * (r.reopened_at - r.broke_at) for r in reopens]
        per_disruption.append(
            {
                "what": f"{disruption.kind} {disruption.replica}",
                "conversations_hit": hit,
                "turns_lost": lost,
                "detected_ms_max": max(detect_ms, default=0.0),
                "reopened_ms_max": max(reopen_ms, default=0.0),
            }
        )
    all_turns = [t for c in callers for t in c.turns]
    errors: dict[str, int] = {}
    for t in all_turns:
        if t.error:
            errors[t.error] = errors.get(t.error, 0) + 1
    return FailoverResult(
        callers=len(callers),
        turns=turns * len(callers),
        turns_ok=sum(1 for t in all_turns if not t.error),
        turns_lost=sum(1 for t in all_turns if t.error),
        conversations_ended=sum(1 for c in callers if c.ended or len(c.turns) < turns),
        spread=spread,
        disruptions=per_disruption,
        max_lost_per_hit=max_lost,
        errors=errors,
        timeline=[
            [
                (
                    round((t.failed_at or t.finalized_at) - started, 2),
                    f"{t.error}: {t.detail}" if t.error else f"{t.turn_ms:.0f} ms",
                )
                for t in caller.turns
            ]
            for caller in callers
        ],
    )


async def run(
    targets: Targets,
    replicas: dict[str, list[Replica]],
    question: bytes,
    callers: int,
    turns: int,
    plan: CallPlan,
    kill: tuple[str, float],
    drain: tuple[str, float],
) -> FailoverResult:
    """Hold the conversations through the replicas while one is killed and one drained."""
    started = time.perf_counter()
    sampler = asyncio.create_task(sample_streams(replicas))
    disruptor = asyncio.create_task(disrupt(replicas, kill[0], kill[1], drain[0], drain[1]))
    try:
        conversations = [Caller(targets, question, plan) for _ in range(callers)]
        results = await asyncio.gather(
            *(
                caller.converse(turns, index, index * caller.question_s / callers)
                for index, caller in enumerate(conversations)
            )
        )
        disruptions = await disruptor
    finally:
        for task in (sampler, disruptor):
            task.cancel()
        await asyncio.wait({sampler, disruptor})
    return summarize(replicas, list(results), disruptions, turns, started)


def report(result: FailoverResult) -> str:
    """The terminal report."""
    spread_rows = [
        (service, address, mean, peak)
        for service, group in result.spread.items()
        for address, (mean, peak) in group.items()
    ]
    disruption_rows = [
        (
            d["what"],
            d["conversations_hit"],
            d["turns_lost"],
            d["detected_ms_max"],
            d["reopened_ms_max"],
        )
        for d in result.disruptions
    ]
    return "\n".join(
        [
            table(spread_rows, ("service", "replica", "mean streams", "peak streams")),
            "",
            table(
                disruption_rows,
                ("disruption", "conversations hit", "turns lost", "noticed ms", "reopened ms"),
            ),
            "",
            f"{result.callers} conversations, {result.turns} turns: {result.turns_ok} ok, "
            f"{result.turns_lost} lost (errors {result.errors or 'none'}); "
            f"{result.conversations_ended} conversations ended early; "
            f"at most {result.max_lost_per_hit} turn(s) lost per conversation and disruption",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """The failover run's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest failover", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--replicas", type=int, default=3, help="replicas of each server (2-8)")
    parser.add_argument("--callers", type=int, default=3, help="conversations at once")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation")
    parser.add_argument("--speed", type=float, default=1.0, help="audio speed; 1 is real time")
    parser.add_argument("--kill", choices=SERVICES, default="tts", help="service to kill one of")
    parser.add_argument("--kill-at-s", type=float, default=8.0, help="when, from the start")
    parser.add_argument("--drain", choices=SERVICES, default="asr", help="service to drain one of")
    parser.add_argument("--drain-at-s", type=float, default=16.0, help="when, from the start")
    parser.add_argument(
        "--drain-grace-s", type=float, default=2.0, help="the replicas' --shutdown-grace-s"
    )
    parser.add_argument("--max-streams", type=int, default=16, help="the replicas' --max-streams")
    parser.add_argument(
        "--turn-deadline-s",
        type=float,
        default=30.0,
        help="a turn whose work takes longer is lost (hearing the reply out is not counted)",
    )
    parser.add_argument(
        "--serve",
        default=f"{shlex.quote(sys.executable)} -m services.{{service}}",
        help="command that runs one server ({service}: asr, tts or llm)",
    )
    parser.add_argument(
        "--server-log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the replicas' --log-level",
    )
    parser.add_argument(
        "--question", default="What is the capital of France, and what is it famous for?"
    )
    parser.add_argument("--json", type=Path, default=Path("artifacts/failover.json"))
    return parser


async def _main(args: argparse.Namespace) -> FailoverResult:
    from loadtest.__main__ import spoken_question

    replicas = await start_replicas(
        args.serve, args.replicas, args.drain_grace_s, args.max_streams, args.server_log_level
    )
    try:
        targets = balanced_targets(replicas)
        print(f"replicas serving: {targets}", flush=True)
        question = await spoken_question(targets.tts, args.question, PLAINTEXT)
        plan = CallPlan(speed=args.speed, deadline_s=args.turn_deadline_s, security=PLAINTEXT)
        return await run(
            targets,
            replicas,
            question,
            args.callers,
            args.turns,
            plan,
            (args.kill, args.kill_at_s),
            (args.drain, args.drain_at_s),
        )
    finally:
        await stop_replicas(replicas)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the report, write the JSON.

    Exits 0 when no conversation ended early and none lost more than the turn in flight to
    one disruption.
    """
    args = build_parser().parse_args(argv)
    if not 2 <= args.replicas <= 8 or not 1 <= args.callers <= 64 or not 1 <= args.turns <= 50:
        raise SystemExit("--replicas must be 2-8, --callers 1-64 and --turns 1-50")
    result = asyncio.run(_main(args))
    print()
    print(report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(result), indent=2))
    print(f"wrote {args.json}")
    return 0 if result.conversations_ended == 0 and result.max_lost_per_hit <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())

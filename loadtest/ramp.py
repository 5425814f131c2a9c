"""Ramps simulated callers up by steps and reports latency, errors and the load test's own CPU."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from loadtest.conversation import Caller, CallerResult, CallPlan, Targets
from loadtest.stats import Summary, table

STAGES = ("asr_ttfb_ms", "llm_ttfb_ms", "tts_ttfb_ms", "turn_ms")


@dataclass
class StepResult:
    """One concurrency step."""

    callers: int
    turns_ok: int
    errors: dict[str, int]
    latency_ms: dict[str, Summary]
    tts_real_time_factor: float  # synthesis time / reply audio time (below 1: faster than real)
    wall_s: float
    loadtest_cpu_percent: float  # of one core
    stopped_reason: str = ""


@dataclass
class RampResult:
    """The whole ramp."""

    steps: list[StepResult] = field(default_factory=list)
    p95_bound_ms: float = 0.0

    def capacity(self) -> int:
        """Most callers held with turn p95 under the bound and no errors."""
        good = [
            s.callers
            for s in self.steps
            if not s.errors and s.latency_ms["turn_ms"].p95 <= self.p95_bound_ms
        ]
        return max(good, default=0)


async def run_step(
    targets: Targets,
    question_pcm: bytes,
    callers: int,
    turns: int,
    plan: CallPlan,
) -> StepResult:
    """`callers` conversations at once, `turns` turns each."""
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    started = time.perf_counter()
    results: list[CallerResult] = await asyncio.gather(
        *(
            caller.converse(
                turns, index, index * caller.question_s / callers if plan.stagger else 0.0
            )
            for index, caller in enumerate(
                Caller(targets, question_pcm, plan) for _ in range(callers)
            )
        )
    )
    wall = time.perf_counter() - started
    cpu = sum(me.cpu_times()[:2]) - cpu_before
    turns_done = [t for r in results for t in r.turns]
    ok = [t for t in turns_done if not t.error]
    errors = Counter(t.error for t in turns_done if t.error)
    audio = sum(t.reply_audio_ms for t in ok)
    return StepResult(
        callers=callers,
        turns_ok=len(ok),
        errors=dict(errors),
        latency_ms={stage: Summary.of([getattr(t, stage) for t in ok]) for stage in STAGES},
        tts_real_time_factor=sum(t.synthesis_ms for t in ok) / audio if audio else 0.0,
        wall_s=wall,
        loadtest_cpu_percent=100 * cpu / wall if wall else 0.0,
    )


async def ramp(
    targets: Targets,
    question_pcm: bytes,
    steps: list[int],
    turns: int,
    plan: CallPlan,
    p95_bound_ms: float,
) -> RampResult:
    """Steps in order; stops after the first step whose turn p95 passes the bound."""
    result = RampResult(p95_bound_ms=p95_bound_ms)
    for callers in steps:
        step = await run_step(targets, question_pcm, callers, turns, plan)
        result.steps.append(step)
        print(step_line(step), flush=True)
        if step.latency_ms["turn_ms"].p95 > p95_bound_ms:
            step.stopped_reason = f"turn p95 above {p95_bound_ms:.0f} ms"
            break
        if step.turns_ok == 0:
            step.stopped_reason = "no turn succeeded"
            break
    return result


def step_line(step: StepResult) -> str:
    """One progress line."""
    turn = step.latency_ms["turn_ms"]
    return (
        f"{step.callers:3d} callers: turn p50 {turn.p50:.0f} ms, p95 {turn.p95:.0f} ms, "
        f"{step.turns_ok} turns ok, errors {step.errors or 'none'}"
    )


def report(result: RampResult) -> str:
    """The terminal table."""
    rows = []
    for s in result.steps:
        lat = s.latency_ms
        rows.append(
            (
                s.callers,
                s.turns_ok,
                sum(s.errors.values()),
                lat["asr_ttfb_ms"].p50,
                lat["llm_ttfb_ms"].p50,
                lat["tts_ttfb_ms"].p50,
                lat["turn_ms"].p50,
                lat["turn_ms"].p95,
                lat["turn_ms"].p99,
                s.tts_real_time_factor,
                s.loadtest_cpu_percent,
            )
        )
    header = (
        "callers",
        "turns",
        "errors",
        "asr p50",
        "llm p50",
        "tts p50",
        "turn p50",
        "turn p95",
        "turn p99",
        "tts rtf",
        "lt cpu%",
    )
    lines = [
        table(rows, header),
        "",
        f"capacity: {result.capacity()} concurrent conversations with turn p95 under "
        f"{result.p95_bound_ms:.0f} ms (in ms; turn = finalize -> first reply audio)",
    ]
    for s in result.steps:
        if s.errors:
            lines.append(f"errors at {s.callers} callers: {s.errors}")
    return "\n".join(lines)


def write_json(result: RampResult, path: Path) -> None:
    """All figures as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "p95_bound_ms": result.p95_bound_ms,
        "capacity": result.capacity(),
        "steps": [asdict(s) for s in result.steps],
    }
    path.write_text(json.dumps(document, indent=2))


def write_plot(result: RampResult, path: Path) -> None:
    """Latency against concurrency: per-stage p50 and the turn's p50/p95."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    callers = [s.callers for s in result.steps]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for stage, style in zip(STAGES[:3], ("--", "-.", ":"), strict=True):
        axes.plot(
            callers,
            [s.latency_ms[stage].p50 for s in result.steps],
            style,
            marker="o",
            label=f"{stage.split('_')[0].upper()} TTFB p50",
        )
    axes.plot(
        callers,
        [s.latency_ms["turn_ms"].p50 for s in result.steps],
        marker="o",
        linewidth=2,
        label="turn p50",
    )
    axes.plot(
        callers,
        [s.latency_ms["turn_ms"].p95 for s in result.steps],
        marker="s",
        linewidth=2,
        label="turn p95",
    )
    axes.axhline(result.p95_bound_ms, color="grey", linewidth=1, label="p95 bound")
    axes.set_xlabel("concurrent conversations")
    axes.set_ylabel("milliseconds")
    axes.set_title("Nemotron Speech Mesh: latency against concurrency")
    axes.set_xticks(callers)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)

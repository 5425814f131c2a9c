"""python -m loadtest.asr_bench: accuracy, latency and capacity of the ASR server.

Over a test set the project makes itself (`loadtest.testset`: about 60 utterances, Piper and
espeak-ng voices, a third with noise), against a real ASR server over gRPC (started here as a
subprocess unless --target names a running one):

1. accuracy in two modes, side by side, so that any gap between them shows. Real time: one
   stream speaks every utterance in 20 ms chunks at real time, each followed by --trailing-ms of
   silence (what a client's VAD waits before it finalizes), with interim results on, the way the
   bots stream. As fast as possible: the same audio (silence included) sent at once, without
   interims, then the finalize: what a one-shot decode of the utterance gives. WER on the clean
   and the noisy part, plain (`testset.normalize`: case, punctuation, digits as words) and
   normalised (Whisper's English text normaliser), and finalize-to-final latency p50/p95;
2. real-time factor of the as-fast-as-possible pass: time from first audio to final over audio
   duration, and server CPU-seconds per audio-second;
3. capacity: N concurrent streams speak at real time (interims on) for N in --steps; the
   largest N whose finalize p95 stays within twice the one-stream p95 of pass 1 is what the
   server sustains. (Pass 1, 60 utterances, is the baseline rather than the ramp's first step.)
   `--steps ""` skips it.

    python -m loadtest.asr_bench [--model tiny.en] [--json artifacts/asr_bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from clients.channel import open_channel
from clients.serving import start_server, wait_serving
from loadtest.stats import Summary, table
from loadtest.testset import (
    Utterance,
    load_or_build,
    read_wav,
    whisper_normalize,
    word_error_rate,
)
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc
from services.runtime.audio import FloatAudio, float_to_pcm16

Req = asr_pb2.StreamingRecognizeRequest
FRAME_S = 0.02
RATE = 16000


@dataclass(frozen=True)
class Result:
    """The final transcript of one utterance and how long it took."""

    utterance: Utterance
    text: str
    latency_ms: float  # finalize sent -> final received (client side)
    elapsed_s: float  # first audio sent -> final received


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.asr_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", help="host:port of a running ASR server (default: start one)")
    parser.add_argument(
        "--model", default="", help="--model for the started server (tiny.en, base, a folder)"
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra flag for the started server"
    )
    parser.add_argument(
        "--testset", type=Path, default=Path("artifacts/asr-testset"), help="test set cache folder"
    )
    parser.add_argument("--no-espeak", action="store_true", help="Piper voices only")
    parser.add_argument(
        "--limit", type=int, default=0, help="use only the first N utterances of each part"
    )
    parser.add_argument(
        "--trailing-ms", type=float, default=300.0, help="silence before each finalize"
    )
    parser.add_argument(
        "--steps", default="1,2,3,4,6,8", help="concurrent streams per capacity step"
    )
    parser.add_argument(
        "--step-utterances", type=int, default=8, help="utterances per stream per step"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=12.0, help="stop the capacity ramp after this"
    )
    parser.add_argument(
        "--json", type=Path, default=Path("artifacts/asr_bench.json"), help="figures out"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return asyncio.run(run(args))


async def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    utterances = load_or_build(args.testset, espeak=not args.no_espeak)
    clean = [u for u in utterances if not u.noisy]
    noisy = [u for u in utterances if u.noisy]
    if args.limit:
        clean, noisy = clean[: args.limit], noisy[: args.limit]
    audio = {u.id: read_wav(args.testset / u.path) for u in clean + noisy}
    server: asyncio.subprocess.Process | None = None
    target = args.target
    if target is None:
        model = ["--model", args.model] if args.model else []
        server, target = await start_server("services.asr", [*model, *args.server_arg])
    try:
        await wait_serving(target)
        async with open_channel(target) as channel:
            stub = asr_pb2_grpc.AsrServiceStub(channel)
            print(f"test set: {len(clean)} clean + {len(noisy)} noisy utterances", flush=True)
            realtime = await stream(stub, clean + noisy, audio, args.trailing_ms, realtime=True)
            figures: dict[str, object] = {"realtime": accuracy_figures(realtime)}
            print(f"real time: {summary_line(figures['realtime'])}", flush=True)
            cpu = psutil.Process(server.pid) if server is not None else None
            cpu_before = _cpu_seconds(cpu)
            fast = await stream(
                stub, clean + noisy, audio, args.trailing_ms, realtime=False, interim=False
            )
            cpu_used = _cpu_seconds(cpu) - cpu_before
            figures["fast"] = accuracy_figures(fast)
            print(f"as fast as possible: {summary_line(figures['fast'])}", flush=True)
            audio_s = sum(r.utterance.duration_s + args.trailing_ms / 1000 for r in fast)
            figures["rtf"] = sum(r.elapsed_s for r in fast) / audio_s
            figures["server_cpu_s_per_audio_s"] = cpu_used / audio_s if cpu is not None else None
            baseline = float(figures["realtime"]["finalize_ms_p95_all"])  # type: ignore[index]
            steps = await capacity(stub, clean, audio, args, started, baseline)
            figures["capacity_steps"] = steps
            figures["capacity_bound_ms"] = 2 * baseline
            figures["sustained_streams"] = sustained(steps, baseline)
    finally:
        if server is not None:
            server.terminate()
            await server.wait()
    figures.update(
        model=args.model or "default",
        cores=os.cpu_count(),
        trailing_ms=args.trailing_ms,
        utterances=len(clean) + len(noisy),
        wall_s=round(time.monotonic() - started, 1),
    )
    print(report(figures))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=1))
    print(f"wrote {args.json}")
    return 0


def accuracy_figures(results: list[Result]) -> dict[str, object]:
    """WER by part (plain and normalised) and finalize-to-final latency of one pass."""
    parts = {
        "clean": [r for r in results if not r.utterance.noisy],
        "noisy": [r for r in results if r.utterance.noisy],
        "clean_piper": [
            r for r in results if not r.utterance.noisy and r.utterance.voice.startswith("piper")
        ],
        "clean_espeak": [
            r for r in results if not r.utterance.noisy and r.utterance.voice.startswith("espeak")
        ],
    }
    figures: dict[str, object] = {}
    for part, chosen in parts.items():
        pairs = [(r.utterance.text, r.text) for r in chosen]
        figures[f"wer_{part}"] = word_error_rate(pairs) if pairs else None
        figures[f"wer_{part}_normalised"] = (
            word_error_rate(pairs, whisper_normalize) if pairs else None
        )
    short = Summary.of([r.latency_ms for r in results if r.utterance.duration_s <= 5.0])
    every = Summary.of([r.latency_ms for r in results])
    figures.update(
        finalize_ms_p50=short.p50,
        finalize_ms_p95=short.p95,
        finalize_ms_max=short.max,
        finalize_ms_p95_all=every.p95,
        errors=[
            {"id": r.utterance.id, "ref": r.utterance.text, "hyp": r.text}
            for r in results
            if word_error_rate([(r.utterance.text, r.text)], whisper_normalize) > 0
        ],
    )
    return figures


def summary_line(figures: object) -> str:
    """WER clean and noisy (normalised in brackets) and finalize p50/p95 of one pass."""
    assert isinstance(figures, dict)
    p50, p95 = figures["finalize_ms_p50"], figures["finalize_ms_p95"]
    return (
        f"WER clean {_wer(figures, 'clean')}, noisy {_wer(figures, 'noisy')}; "
        f"finalize p50 {p50:.0f} ms, p95 {p95:.0f} ms"
    )


def _wer(figures: dict[str, object], part: str) -> str:
    """E.g. "7.3 % (4.6 %)": plain WER of a part, normalised in brackets."""
    return f"{_percent(figures[f'wer_{part}'])} ({_percent(figures[f'wer_{part}_normalised'])})"


def _percent(value: object) -> str:
    return "-" if value is None else f"{100 * float(value):.1f} %"  # type: ignore[arg-type]


async def capacity(
    stub: asr_pb2_grpc.AsrServiceStub,
    utterances: list[Utterance],
    audio: dict[str, FloatAudio],
    args: argparse.Namespace,
    started: float,
    baseline_p95_ms: float,
) -> list[dict[str, float]]:
    """Finalize latency at each step of concurrent real-time streams, until p95 doubles."""
    steps: list[dict[str, float]] = []
    for n in (int(s) for s in args.steps.split(",") if s.strip()):
        if time.monotonic() - started > 60 * args.max_minutes:
            print(f"time budget spent; stopping before {n} streams")
            break
        plans = [
            [utterances[(k * 7 + i) % len(utterances)] for i in range(args.step_utterances)]
            for k in range(n)
        ]
        runs = await asyncio.gather(
            *(
                stream(stub, plan, audio, args.trailing_ms, realtime=True, delay_s=0.37 * k)
                for k, plan in enumerate(plans)
            )
        )
        results = [r for run in runs for r in run]
        latency = Summary.of([r.latency_ms for r in results])
        wer = word_error_rate([(r.utterance.text, r.text) for r in results])
        steps.append({"streams": n, "p50_ms": latency.p50, "p95_ms": latency.p95, "wer": wer})
        print(
            f"{n} streams: finalize p50 {latency.p50:.0f} ms, "
            f"p95 {latency.p95:.0f} ms, WER {wer:.3f}",
            flush=True,
        )
        if latency.p95 > 2 * baseline_p95_ms:
            break
    return steps


def sustained(steps: list[dict[str, float]], baseline_p95_ms: float) -> int:
    """The most streams before finalize p95 first exceeds twice the one-stream p95."""
    count = 0
    for step in steps:
        if step["p95_ms"] > 2 * baseline_p95_ms:
            break
        count = int(step["streams"])
    return count


async def stream(
    stub: asr_pb2_grpc.AsrServiceStub,
    utterances: list[Utterance],
    audio: dict[str, FloatAudio],
    trailing_ms: float,
    realtime: bool,
    interim: bool = True,
    delay_s: float = 0.0,
) -> list[Result]:
    """Speak `utterances` on one call, waiting for each final before the next utterance."""
    answered: dict[str, asyncio.Event] = {u.id: asyncio.Event() for u in utterances}
    sent: dict[str, tuple[float, float]] = {}  # id -> (first audio, finalize) perf_counter
    results: list[Result] = []
    pad = np.zeros(round(trailing_ms / 1000 * RATE), dtype=np.float32)

    async def requests() -> AsyncIterator[Req]:
        await asyncio.sleep(delay_s)
        yield Req(config=asr_pb2.RecognitionConfig(sample_rate_hz=RATE, interim_results=interim))
        for u in utterances:
            pcm = float_to_pcm16(np.concatenate([audio[u.id], pad]))
            frame = round(FRAME_S * RATE) * 2
            start = time.perf_counter()
            for k, offset in enumerate(range(0, len(pcm), frame)):
                if realtime:  # a microphone delivers each frame once it has been recorded
                    await asyncio.sleep(max(0.0, start + (k + 1) * FRAME_S - time.perf_counter()))
                yield Req(audio=pcm[offset : offset + frame])
            sent[u.id] = (start, time.perf_counter())
            yield Req(finalize=asr_pb2.Finalize(utterance_id=u.id))
            await asyncio.wait_for(answered[u.id].wait(), 120)

    by_id = {u.id: u for u in utterances}
    call = stub.StreamingRecognize(requests())
    async for response in call:
        transcript = response.transcript
        if response.WhichOneof("response") == "transcript" and transcript.is_final:
            now = time.perf_counter()
            first, finalized = sent[transcript.utterance_id]
            u = by_id[transcript.utterance_id]
            results.append(Result(u, transcript.text, 1000 * (now - finalized), now - first))
            answered[u.id].set()
            if len(results) == len(utterances):
                call.cancel()
                break
    return results


def _cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def report(figures: dict[str, object]) -> str:
    """The figures as text tables: the two modes side by side, then speed and capacity."""
    realtime, fast = figures["realtime"], figures["fast"]
    assert isinstance(realtime, dict) and isinstance(fast, dict)
    rows: list[list[object]] = []
    for part, label in (
        ("clean", "clean"),
        ("clean_piper", "clean, Piper voices"),
        ("clean_espeak", "clean, espeak-ng voices"),
        ("noisy", "noisy"),
    ):
        if realtime[f"wer_{part}"] is None:
            continue
        rows.append(
            [
                f"WER {label}: plain (normalised)",
                _wer(realtime, part),
                _wer(fast, part),
            ]
        )
    for key, label in (
        ("finalize_ms_p50", "finalize-to-final p50 ms (<= 5 s utterances)"),
        ("finalize_ms_p95", "finalize-to-final p95 ms (<= 5 s utterances)"),
        ("finalize_ms_p95_all", "finalize-to-final p95 ms, all utterances"),
    ):
        rows.append([label, f"{realtime[key]:.0f}", f"{fast[key]:.0f}"])
    modes = table(rows, ["figure", "real time, 20 ms chunks + interims", "as fast as possible"])
    speed = [
        ["real-time factor (1 stream, as fast as possible)", figures["rtf"]],
        ["server CPU-s per audio-s", figures["server_cpu_s_per_audio_s"] or float("nan")],
        ["sustained real-time streams (finalize p95 within 2x)", figures["sustained_streams"]],
    ]
    steps = figures["capacity_steps"]
    assert isinstance(steps, list)
    ramp = table(
        [[s["streams"], s["p50_ms"], s["p95_ms"], s["wer"]] for s in steps],
        ["streams", "p50 ms", "p95 ms", "WER"],
    )
    return modes + "\n\n" + table(speed, ["figure", "value"]) + ("\n\n" + ramp if steps else "")


if __name__ == "__main__":
    sys.exit(main())

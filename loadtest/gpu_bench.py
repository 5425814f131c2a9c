"""python -m loadtest gpu: the speech models' real architectures, random weights, on a GPU.

Builds Parakeet realtime 0.6B (cache-aware FastConformer-RNNT) and Magpie TTS multilingual 357M
with its codec from their published configurations (`loadtest.gpu_bench_models`), with random
weights, and measures them through our own backends:

- ASR: our batched stream step (`StepBatcher` + `ParakeetAsrBackend._forward`) at N concurrent
  streams for each right context: step latency p50/p95, GPU memory per stream, and the most
  streams whose p95 step stays under the chunk's duration (searched past the listed counts);
- TTS: time to first audio chunk and real-time factor of `MagpieTtsBackend` at C concurrent
  STREAM syntheses of a bounded length (random weights never emit the end token).

Prints a table, writes JSON (--out) and a markdown table (--md). `--small` runs tiny models on
the CPU in seconds (the test does this); without it, the real sizes on CUDA when present.
A time budget (--budget-s) skips what would not fit, and says so in the output.

    python -m loadtest gpu --out artifacts/gpu_bench.json --md artifacts/gpu_bench.md
    python -m loadtest gpu --small --out /tmp/gpu_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

KIND = "random-weight runs of the real architectures"
NOTES = [
    "Random weights, published architectures: the compute per step is the trained models', the "
    "output is noise.",
    "ASR: the random joint's blank logit is shifted so that it emits about 0.3 tokens per 80 ms "
    "frame (speech-like); the rate reached is in asr.tokens_per_frame. fp32, as the backend runs.",
    "ASR step: from the first stream's submission to the last stream's completion of one chunk "
    "each, through our StepBatcher and forward pass; features are not included.",
    "TTS: random weights never emit the end-of-audio token (it is forbidden outright), so each "
    "job is exactly max_decoder_steps frames; the codec decode of each chunk is included. The "
    "backend runs one synthesis at a time on its GPU thread: concurrent jobs queue.",
]


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--small", action="store_true", help="tiny models and counts (CPU test)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--out", type=Path, required=True, help="JSON output path")
    parser.add_argument("--md", type=Path, help="markdown table output path")
    parser.add_argument("--streams", help="ASR stream counts (default 1,16,64,256,512)")
    parser.add_argument("--right-contexts", default="1,6", help="ASR right contexts")
    parser.add_argument("--warmup", type=int, help="untimed ASR steps per point")
    parser.add_argument("--steps", type=int, help="timed ASR steps per point")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="streams per forward pass (the server's --max-batch); 0: all in one",
    )
    parser.add_argument("--search-cap", type=int, help="most streams the capacity search tries")
    parser.add_argument("--search-probes", type=int, help="capacity probes per right context")
    parser.add_argument("--tts-concurrency", help="concurrent TTS streams (default 1,4,16)")
    parser.add_argument("--tts-frames", type=int, help="codec frames per TTS job (bounded)")
    parser.add_argument("--tts-chunk-frames", type=int, default=4, help="frames per audio chunk")
    parser.add_argument("--skip-asr", action="store_true")
    parser.add_argument("--skip-tts", action="store_true")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting new work")
    return parser


def defaults(args: argparse.Namespace) -> None:
    """Fill the flags left unset with the full run's or the small run's values."""
    small = args.small
    for name, full, tiny in (
        ("streams", "1,16,64,256,512", "1,2,4"),
        ("warmup", 3, 1),
        ("steps", 20, 3),
        ("search_cap", 4096, 8),
        ("search_probes", 5, 2),
        ("tts_concurrency", "1,4,16", "1,2"),
        ("tts_frames", 64, 8),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)


def counts(text: str, flag: str) -> list[int]:
    """A comma-separated list of positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected integers like 1,16,64, got {text!r}") from None
    if not values or min(values) < 0:
        raise SystemExit(f"{flag}: expected non-negative integers, got {text!r}")
    return values


def environment(device: str) -> dict[str, Any]:
    """Versions and the device: what a figure was measured with."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "cpu": _cpu_model(),
    }
    try:
        from importlib.metadata import version

        env["nemo_toolkit"] = version("nemo_toolkit")
    except Exception:  # the version is informative only
        env["nemo_toolkit"] = "unknown"
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        env["gpu"] = properties.name
        env["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        env["compute_capability"] = f"{properties.major}.{properties.minor}"
        env["driver"] = _driver_version()
    else:
        env["gpu"] = None
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _driver_version() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


class Budget:
    """Wall-clock budget: work that would start after the deadline is skipped, and named."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.skipped: list[str] = []

    def allows(self, what: str) -> bool:
        """Whether there is time left for `what`; if not, record it as skipped."""
        if time.monotonic() < self.deadline:
            return True
        self.skipped.append(what)
        return False


async def run_asr(
    args: argparse.Namespace,
    device: str,
    budget: Budget,
    figures: dict[str, Any],
    save: Callable[[], None],
    between: Callable[[], Awaitable[None]],
) -> None:
    """Every ASR point per right context, then `between` (the TTS), then the capacity searches.

    The searches come last so that the listed points and the TTS are measured first when time
    is short; the figures are saved after each point.
    """
    from loadtest import gpu_bench_asr as asr
    from loadtest.gpu_bench_models import ASR_TOKENS_PER_FRAME, build_asr_model, parameter_count

    streams = counts(args.streams, "--streams")
    contexts = counts(args.right_contexts, "--right-contexts")
    started = time.perf_counter()
    model = build_asr_model(args.small)
    result: dict[str, Any] = {
        "model": "nemotron-speech-streaming-en-0.6b architecture" + (" (small)" * args.small),
        "parameters": parameter_count(model),
        "encoder_layers": int(model.cfg.encoder.n_layers),
        "d_model": int(model.cfg.encoder.d_model),
        "build_s": round(time.perf_counter() - started, 1),
        "max_batch": args.max_batch or "all streams",
        "tokens_per_frame_target": ASR_TOKENS_PER_FRAME,
        "points": [],
        "capacity": [],
    }
    figures["asr"] = result
    most = max([*streams, args.search_cap])
    backends = {}
    points: list[asr.AsrPoint] = []
    try:
        for context in contexts:
            if not budget.allows(f"asr right context {context}"):
                continue
            backend = await asr.loaded_backend(model, context, device, args.max_batch or most)
            backends[context] = backend
            if "tokens_per_frame" not in result:
                result["tokens_per_frame"] = round(await asr.tune_emission(backend), 3)
            for n in streams:
                if budget.allows(f"asr right context {context} at {n} streams"):
                    point = await asr.measure(backend, n, args.warmup, args.steps)
                    points.append(point)
                    result["points"].append(point.as_dict())
                    save()
                    print(_asr_line(point), flush=True)
        await between()
        for context, backend in backends.items():
            found = await asr.capacity(
                backend,
                [p for p in points if p.right_context == context],
                args.warmup,
                args.steps,
                args.search_cap,
                args.search_probes,
                functools.partial(budget.allows, f"asr capacity probe, right context {context}"),
            )
            result["capacity"].append(found.as_dict())
            save()
            print(
                f"asr rc={context}: at most {found.max_streams} streams with p95 < "
                f"{found.chunk_ms:.0f} ms",
                flush=True,
            )
    finally:
        for backend in backends.values():
            await backend.aclose()


def _asr_line(point: Any) -> str:
    return (
        f"asr rc={point.right_context} streams={point.streams}: step p50 "
        f"{point.step_ms_p50:.1f} ms p95 {point.step_ms_p95:.1f} ms {point.error}"
    )


async def run_tts(args: argparse.Namespace, device: str, budget: Budget) -> dict[str, Any]:
    """Magpie at each concurrency."""
    from loadtest import gpu_bench_tts as tts
    from loadtest.gpu_bench_models import build_magpie, magpie_parameters

    with tempfile.TemporaryDirectory(prefix="gpu_bench_codec_") as directory:
        started = time.perf_counter()
        model = build_magpie(Path(directory), args.small, args.tts_frames)
        sizes = magpie_parameters(model)
        backend = await tts.loaded_backend(model, device, args.tts_chunk_frames)
        del model
        result: dict[str, Any] = {
            "model": "magpie_tts_multilingual_357m architecture" + (" (small)" * args.small),
            **sizes,
            "build_s": round(time.perf_counter() - started, 1),
            "sample_rate_hz": backend.voices[0].sample_rate_hz,
            "max_decoder_steps": args.tts_frames,
            "chunk_frames": args.tts_chunk_frames,
            "end_token": "never emitted by random weights (forbidden): jobs are max_decoder_steps",
            "points": [],
        }
        try:
            for concurrency in counts(args.tts_concurrency, "--tts-concurrency"):
                if budget.allows(f"tts at {concurrency} streams"):
                    point = await tts.measure(backend, concurrency, args.tts_frames)
                    result["points"].append(point.as_dict())
                    print(
                        f"tts streams={concurrency}: first audio p50 {point.ttfa_ms_p50:.0f} ms"
                        f" p95 {point.ttfa_ms_p95:.0f} ms, RTF p50 {point.rtf_p50:.3f} "
                        f"{point.error}",
                        flush=True,
                    )
        finally:
            await backend.aclose()
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the flags ask for, within the budget; the figures (saved as they come)."""
    import torch

    defaults(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    budget = Budget(args.budget_s)
    figures: dict[str, Any] = {
        "kind": KIND,
        "small": args.small,
        "environment": environment(device),
        "notes": NOTES,
        "skipped_for_time": budget.skipped,
    }
    print(json.dumps(figures["environment"]), flush=True)

    def save() -> None:  # a run stopped from outside still leaves what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")

    async def tts() -> None:
        if not args.skip_tts and budget.allows("tts"):
            figures["tts"] = await run_tts(args, device, budget)
            save()

    save()
    if args.skip_asr:
        await tts()
    else:
        await run_asr(args, device, budget, figures, save, tts)
    save()
    return figures


def report(figures: dict[str, Any]) -> str:
    """The figures as markdown tables (also what is printed)."""
    from loadtest.gpu_bench_report import markdown

    return markdown(figures)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write JSON (and markdown); print the table."""
    args = build_parser().parse_args(argv)
    # NeMo logs every module it builds at INFO, and warns about training-only settings.
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = 0
    try:
        figures = asyncio.run(run(args))
    except KeyboardInterrupt:  # stopped from outside (the device script's hard stop)
        if not args.out.is_file():
            raise
        figures = json.loads(args.out.read_text())
        figures["interrupted"] = True
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        code = 130
    table = report(figures)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table + "\n")
    print()
    print(table)
    print(f"wrote {args.out}" + (f" and {args.md}" if args.md else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())

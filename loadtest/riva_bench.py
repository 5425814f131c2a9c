"""python -m loadtest.riva_bench: the Riva-compatible API against the v1 API, same servers.

Both paths run on one ASR server and one TTS server (started here as subprocesses unless
--asr/--tts name running ones), so the backend, its model and its warm state are shared; the
paths take turns, one call at a time with a pause between calls, so neither runs under the
other's load.

- ASR: each sentence (Piper's joe voice) is streamed at real time in 20 ms frames, followed by
  --trailing-ms of silence. v1 sends its finalize after that silence, as a bot's VAD would; the
  Riva path sends nothing and the server's endpointing ends the utterance (stop_history set to
  the same silence). Measured: first audio sent -> first result (interim) received, end of
  speech -> final received, and the WER of the finals. A first result is the first with text
  (v1 also sends an empty interim before any word).
- TTS: one sentence per call; v1 Synthesize (STREAM mode) and Riva SynthesizeOnline: request
  sent -> first audio received; Riva Synthesize: request sent -> the whole audio received.

    python -m loadtest.riva_bench [--rounds 2] [--json artifacts/riva_bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from riva.proto import (
    riva_asr_pb2,
    riva_asr_pb2_grpc,
    riva_audio_pb2,
    riva_tts_pb2,
    riva_tts_pb2_grpc,
)

from clients.channel import open_channel
from clients.serving import start_server, wait_serving
from loadtest.stats import Summary, table
from loadtest.testset import piper_speech, word_error_rate
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, tts_pb2, tts_pb2_grpc
from services.runtime.audio import float_to_pcm16

RATE = 16000
FRAME_S = 0.02
#: Idle time before each call, so that no call waits behind work its predecessor left running
#: (an interim decode, the rest of a cancelled sentence).
GAP_S = 0.5
SENTENCES = (
    "Please book a table for two at seven tonight.",
    "What is the weather like in Paris tomorrow morning?",
    "Turn off the lights in the kitchen.",
    "How long does it take to drive to the airport from here?",
    "Remind me to call my sister after lunch.",
    "Play some quiet music in the living room.",
)


class AsrRun:
    """When the first result and the final of one utterance arrived, and the final's text."""

    def __init__(self) -> None:
        self.first_sent = 0.0
        self.speech_end = 0.0
        self.first_result: float | None = None
        self.final_at = 0.0
        self.text = ""

    def got(self, text: str, final: bool) -> None:
        now = time.perf_counter()
        if self.first_result is None and text:  # v1 may send an empty interim first
            self.first_result = now
        if final:
            self.final_at, self.text = now, f"{self.text} {text}".strip()


async def _paced(pcm: bytes, speech_bytes: int, run: AsrRun) -> AsyncIterator[bytes]:
    """`pcm` in 20 ms frames at real time, noting when the first and the last speech frame left."""
    frame = round(FRAME_S * RATE) * 2
    start = run.first_sent = time.perf_counter()
    for k, offset in enumerate(range(0, len(pcm), frame)):
        await asyncio.sleep(max(0.0, start + (k + 1) * FRAME_S - time.perf_counter()))
        yield pcm[offset : offset + frame]
        if offset < speech_bytes <= offset + frame:
            run.speech_end = time.perf_counter()


async def asr_v1(stub: asr_pb2_grpc.AsrServiceStub, speech: bytes, pad: bytes) -> AsrRun:
    run = AsrRun()
    Req = asr_pb2.StreamingRecognizeRequest

    async def requests() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
        yield Req(config=asr_pb2.RecognitionConfig(sample_rate_hz=RATE, interim_results=True))
        async for chunk in _paced(speech + pad, len(speech), run):
            yield Req(audio=chunk)
        yield Req(finalize=asr_pb2.Finalize(utterance_id="u"))

    call = stub.StreamingRecognize(requests())
    async for response in call:
        if response.WhichOneof("response") == "transcript":
            run.got(response.transcript.text, response.transcript.is_final)
            if response.transcript.is_final:
                call.cancel()
                break
    return run


async def asr_riva(
    stub: riva_asr_pb2_grpc.RivaSpeechRecognitionStub, speech: bytes, pad: bytes, stop_ms: int
) -> AsrRun:
    run = AsrRun()
    Req = riva_asr_pb2.StreamingRecognizeRequest
    config = riva_asr_pb2.RecognitionConfig(
        encoding=riva_audio_pb2.LINEAR_PCM,
        sample_rate_hertz=RATE,
        language_code="en-US",
        enable_automatic_punctuation=True,
        endpointing_config=riva_asr_pb2.EndpointingConfig(stop_history=stop_ms),
    )

    async def requests() -> AsyncIterator[riva_asr_pb2.StreamingRecognizeRequest]:
        streaming = riva_asr_pb2.StreamingRecognitionConfig(config=config, interim_results=True)
        yield Req(streaming_config=streaming)
        async for chunk in _paced(speech + pad, len(speech), run):
            yield Req(audio_content=chunk)

    call = stub.StreamingRecognize(requests())
    async for response in call:
        for result in response.results:
            run.got(result.alternatives[0].transcript, result.is_final)
        if any(result.is_final for result in response.results):
            call.cancel()
            break
    return run


async def first_audio(call: Callable[[], AsyncIterator[object]]) -> float:
    """Milliseconds from the call to its first response; the call is read to its end.

    Reading it out matters: a call cancelled after its first audio leaves the rest of its
    sentence being synthesized, which the next call would wait behind.
    """
    started = time.perf_counter()
    first: float | None = None
    async for _ in call():
        first = first or time.perf_counter()
    if first is None:
        raise RuntimeError("no audio")
    return 1000 * (first - started)


async def timed(awaitable: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await awaitable()
    return 1000 * (time.perf_counter() - started)


async def bench_tts(channel: grpc.aio.Channel, rounds: int) -> dict[str, list[float]]:
    v1 = tts_pb2_grpc.TtsServiceStub(channel)
    riva = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel)
    figures: dict[str, list[float]] = {"v1_first": [], "riva_online_first": [], "riva_whole": []}

    def v1_call(text: str) -> Callable[[], AsyncIterator[object]]:
        def requests() -> AsyncIterator[tts_pb2.SynthesizeRequest]:
            async def gen() -> AsyncIterator[tts_pb2.SynthesizeRequest]:
                yield tts_pb2.SynthesizeRequest(config=tts_pb2.SynthesisConfig())
                yield tts_pb2.SynthesizeRequest(text=tts_pb2.TextSegment(text=text))
                yield tts_pb2.SynthesizeRequest(close=tts_pb2.CloseStream())

            return gen()

        async def audio() -> AsyncIterator[object]:
            async for response in v1.Synthesize(requests()):
                if response.WhichOneof("response") == "audio":
                    yield response

        return audio

    def riva_request(text: str) -> riva_tts_pb2.SynthesizeSpeechRequest:
        return riva_tts_pb2.SynthesizeSpeechRequest(
            text=text,
            language_code="en-US",
            encoding=riva_audio_pb2.LINEAR_PCM,
            sample_rate_hz=22050,
        )

    for _ in range(rounds):
        for text in SENTENCES:
            await asyncio.sleep(GAP_S)
            figures["v1_first"].append(await first_audio(v1_call(text)))
            request = riva_request(text)

            def online(r: riva_tts_pb2.SynthesizeSpeechRequest = request) -> AsyncIterator[object]:
                return riva.SynthesizeOnline(iter([r]))  # type: ignore[no-any-return]

            async def whole(r: riva_tts_pb2.SynthesizeSpeechRequest = request) -> object:
                return await riva.Synthesize(r)

            await asyncio.sleep(GAP_S)
            figures["riva_online_first"].append(await first_audio(online))
            await asyncio.sleep(GAP_S)
            figures["riva_whole"].append(await timed(whole))
    return figures


async def bench_asr(
    channel: grpc.aio.Channel, rounds: int, trailing_ms: float
) -> dict[str, object]:
    v1 = asr_pb2_grpc.AsrServiceStub(channel)
    riva = riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel)
    pad = b"\0\0" * round(trailing_ms / 1000 * RATE)
    runs: dict[str, list[tuple[str, AsrRun]]] = {"v1": [], "riva": []}
    for _ in range(rounds):
        for text in SENTENCES:
            speech = float_to_pcm16(piper_speech(text))
            await asyncio.sleep(GAP_S)
            runs["v1"].append((text, await asr_v1(v1, speech, pad)))
            await asyncio.sleep(GAP_S)
            runs["riva"].append((text, await asr_riva(riva, speech, pad, round(trailing_ms))))
    figures: dict[str, object] = {}
    for path, done in runs.items():
        firsts = [1000 * ((r.first_result or r.final_at) - r.first_sent) for _, r in done]
        finals = [1000 * (r.final_at - r.speech_end) for _, r in done]
        figures[f"{path}_first_result_ms"] = Summary.of(firsts).__dict__
        figures[f"{path}_final_after_speech_ms"] = Summary.of(finals).__dict__
        figures[f"{path}_wer"] = word_error_rate([(text, r.text) for text, r in done])
    return figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.riva_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--asr", help="host:port of a running ASR server (default: start one)")
    parser.add_argument("--tts", help="host:port of a running TTS server (default: start one)")
    parser.add_argument("--rounds", type=int, default=2, help="times through the sentences")
    parser.add_argument(
        "--trailing-ms", type=float, default=300.0, help="silence after speech (v1's VAD wait)"
    )
    parser.add_argument("--json", type=Path, default=Path("artifacts/riva_bench.json"))
    return parser


async def run(args: argparse.Namespace) -> int:
    servers: list[asyncio.subprocess.Process] = []
    targets: dict[str, str] = {}
    for name, given in (("asr", args.asr), ("tts", args.tts)):
        if given is None:
            process, given = await start_server(f"services.{name}")
            servers.append(process)
        targets[name] = given
    try:
        for target in targets.values():
            await wait_serving(target, timeout_s=120)
        async with open_channel(targets["asr"]) as asr, open_channel(targets["tts"]) as tts:
            figures = await bench_asr(asr, args.rounds, args.trailing_ms)
            figures.update(
                {k: Summary.of(v).__dict__ for k, v in (await bench_tts(tts, args.rounds)).items()}
            )
    finally:
        for process in servers:
            process.terminate()
            await process.wait()
    figures.update(cores=os.cpu_count(), rounds=args.rounds, trailing_ms=args.trailing_ms)
    print(report(figures))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=1))
    print(f"wrote {args.json}")
    return 0


def report(figures: dict[str, object]) -> str:
    def row(label: str, key: str) -> list[object]:
        summary = figures[key]
        assert isinstance(summary, dict)
        return [label, summary["count"], summary["p50"], summary["p95"]]

    rows = [
        row("ASR v1: first audio -> first result", "v1_first_result_ms"),
        row("ASR Riva: first audio -> first result", "riva_first_result_ms"),
        row("ASR v1: end of speech -> final (finalize)", "v1_final_after_speech_ms"),
        row("ASR Riva: end of speech -> final (endpointing)", "riva_final_after_speech_ms"),
        row("TTS v1 Synthesize: text -> first audio", "v1_first"),
        row("TTS Riva SynthesizeOnline: text -> first audio", "riva_online_first"),
        row("TTS Riva Synthesize: text -> whole audio", "riva_whole"),
    ]
    wer = f"WER v1 {figures['v1_wer']:.3f}, Riva {figures['riva_wer']:.3f}"
    return table(rows, ["path", "n", "p50 ms", "p95 ms"]) + f"\n{wer}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    return asyncio.run(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

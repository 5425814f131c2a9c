"""What the transport costs: our gRPC servicers vs JSON over WebSocket vs a direct call.

The same message pattern goes three ways, to the same zero-work engines (defined here, so that
only transport and protocol handling are measured):

- ASR: 20 ms LINEAR16 frames at 16 kHz in, one small transcript out per frame;
- TTS: a text segment in, PCM chunks (20 ms each) and an end-of-segment marker out.

(a) grpc: the real AsrService/TtsService servicers and runtime, in a server subprocess;
(b) websocket: JSON control messages and binary audio frames, as other voice stacks do it, in a
    server subprocess running the same engines through the same queue;
(c) inprocess: the engines called directly, in this process;
(d) grpc-bare: a bare grpc.aio servicer that answers each request at once, with none of our
    runtime: the floor of gRPC in Python, so that (a) - (d) is what our protocol layer costs.

Per-message latency comes from ping-pong exchanges (one frame or text outstanding); messages per
second per core from pipelined streams, divided by the CPU seconds the server process used.

    python -m loadtest.transport [--frames 2000] [--streams 8] [--json artifacts/transport.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from clients.channel import open_channel
from clients.security import ClientSecurity
from loadtest.stats import Summary, table
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, tts_pb2, tts_pb2_grpc
from services.asr.backend import (
    AsrBackend,
    AudioEvent,
    FinalizeEvent,
    Hypothesis,
    RecognizerEvent,
    StreamOptions,
)
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.runtime.audio import FloatAudio, float_to_pcm16, pcm16_to_float
from services.runtime.server import MeshServer
from services.runtime.streams import StreamQueue
from services.tts.backend import SynthesisJob, SynthesisMode, TtsBackend, Voice
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings

RATE = 16000
FRAME = b"\x01\x00" * (RATE // 50)  # 20 ms of (nearly) silence
TTS_CHUNKS = 10  # chunks per text segment
TTS_CHUNK = np.zeros(RATE // 50, dtype=np.float32)
VOICE = Voice("zero", ("en",), RATE)
OPTIONS = StreamOptions(session_id="bench", language="en", interim_results=True)


class ZeroWorkAsrEngine(AsrBackend):
    """Answers every frame at once with a new (tiny) text; the subject of no measurement."""

    name = "zero-work"

    @property
    def model_name(self) -> str:
        return "none"

    async def recognize(
        self, options: StreamOptions, events: StreamQueue[RecognizerEvent]
    ) -> AsyncGenerator[Hypothesis, None]:
        count = 0
        async for event in events:
            count += 1
            answers = event if isinstance(event, FinalizeEvent) else None
            yield Hypothesis(str(count), 20.0 * count, answers=answers)


class ZeroWorkTtsEngine(TtsBackend):
    """Yields TTS_CHUNKS chunks of 20 ms of silence for any text."""

    name = "zero-work"

    @property
    def model_name(self) -> str:
        return "none"

    @property
    def voices(self) -> Sequence[Voice]:
        return (VOICE,)

    async def synthesize(self, job: SynthesisJob) -> AsyncGenerator[FloatAudio, None]:
        for _ in range(TTS_CHUNKS):
            yield TTS_CHUNK


# ---- servers (run in a subprocess) ---------------------------------------------------------------


async def serve_grpc(kind: str) -> None:
    """The real servicer with a zero-work engine, on a free port; prints READY <port>."""
    if kind == "asr":
        service: Any = AsrService(AsrSettings(port=0, max_streams=256), ZeroWorkAsrEngine())
    else:
        service = TtsService(TtsSettings(port=0, max_streams=256), ZeroWorkTtsEngine())
    server = MeshServer(service)
    port = await server.start()
    await server.wait_loaded()
    print(f"READY {port}", flush=True)
    await asyncio.Event().wait()


class BareAsrServicer(asr_pb2_grpc.AsrServiceServicer):
    """grpc.aio with nothing of ours: one response per request, straight back."""

    async def StreamingRecognize(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[asr_pb2.StreamingRecognizeResponse, None]:
        count = 0
        async for request in request_iterator:
            count += 1
            if request.HasField("config"):
                yield asr_pb2.StreamingRecognizeResponse(ready=asr_pb2.RecognizerReady())
            else:
                transcript = asr_pb2.Transcript(text=str(count))
                yield asr_pb2.StreamingRecognizeResponse(transcript=transcript)


class BareTtsServicer(tts_pb2_grpc.TtsServiceServicer):
    """grpc.aio with nothing of ours: TTS_CHUNKS audio messages and a completion per text."""

    async def Synthesize(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[tts_pb2.SynthesizeResponse, None]:
        pcm = float_to_pcm16(TTS_CHUNK)
        first = True
        async for request in request_iterator:
            if not request.HasField("text"):
                continue
            if first:
                yield tts_pb2.SynthesizeResponse(stream_created=tts_pb2.StreamCreated())
                first = False
            for index in range(TTS_CHUNKS):
                chunk = tts_pb2.AudioChunk(stream_id="s", segment_id="s", audio=pcm, sequence=index)
                yield tts_pb2.SynthesizeResponse(audio=chunk)
            complete = tts_pb2.SegmentComplete(stream_id="s", segment_id="s")
            yield tts_pb2.SynthesizeResponse(segment_complete=complete)


async def serve_bare_grpc() -> None:
    """Both bare servicers on one grpc.aio server; prints READY <port>."""
    server = grpc.aio.server()
    asr_pb2_grpc.add_AsrServiceServicer_to_server(BareAsrServicer(), server)
    tts_pb2_grpc.add_TtsServiceServicer_to_server(BareTtsServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY {port}", flush=True)
    await server.wait_for_termination()


async def _ws_asr(socket: ServerConnection) -> None:
    events: StreamQueue[RecognizerEvent] = StreamQueue(64)

    async def read() -> None:
        async for message in socket:
            if isinstance(message, bytes):
                await events.put(AudioEvent(pcm16_to_float(message)))
        events.close()

    reader = asyncio.create_task(read())
    try:
        async for hypothesis in ZeroWorkAsrEngine().recognize(OPTIONS, events):
            await socket.send(
                json.dumps({"type": "transcript", "text": hypothesis.text, "is_final": False})
            )
    finally:
        reader.cancel()


async def _ws_tts(socket: ServerConnection) -> None:
    engine = ZeroWorkTtsEngine()
    async for message in socket:
        request = json.loads(message)
        job = SynthesisJob(request["text"], VOICE, "en", SynthesisMode.STREAM)
        async for chunk in engine.synthesize(job):
            await socket.send(float_to_pcm16(chunk))
        await socket.send(json.dumps({"type": "segment_complete", "id": request["id"]}))


async def serve_websocket() -> None:
    """JSON control + binary audio over WebSocket, as other stacks do it; prints READY <port>."""

    async def handler(socket: ServerConnection) -> None:
        config = json.loads(await socket.recv())
        await (_ws_asr if config["service"] == "asr" else _ws_tts)(socket)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=2**22) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"READY {port}", flush=True)
        await asyncio.Event().wait()


# ---- clients ------------------------------------------------------------------------------------

# The servers above are plaintext on loopback, whatever the environment says: this measures the
# transport itself (TLS would add its handshake once per channel and its record layer per message).
PLAINTEXT = ClientSecurity()

# One exchange: send one unit of input, wait for its whole output; returns when done.
Exchange = Callable[[], Awaitable[None]]


@dataclass
class Session:
    """An open stream with a ping-pong `exchange` and a `close`."""

    exchange: Exchange
    close: Callable[[], Awaitable[None]]


async def grpc_asr_session(target: str) -> Session:
    channel = open_channel(target, PLAINTEXT)
    call = asr_pb2_grpc.AsrServiceStub(channel).StreamingRecognize()
    request = asr_pb2.StreamingRecognizeRequest
    config = asr_pb2.RecognitionConfig(sample_rate_hz=RATE, interim_results=True)
    await call.write(request(config=config))
    await call.read()
    audio = request(audio=FRAME)

    async def exchange() -> None:
        await call.write(audio)
        await call.read()

    async def close() -> None:
        call.cancel()
        await channel.close()

    return Session(exchange, close)


async def grpc_tts_session(target: str) -> Session:
    channel = open_channel(target, PLAINTEXT)
    call = tts_pb2_grpc.TtsServiceStub(channel).Synthesize()
    request = tts_pb2.SynthesizeRequest
    await call.write(request(config=tts_pb2.SynthesisConfig()))
    text = request(text=tts_pb2.TextSegment(segment_id="s", text="hello there"))
    first = True

    async def exchange() -> None:
        nonlocal first
        await call.write(text)
        expected = TTS_CHUNKS + 1 + int(first)  # audio, segment_complete (+ stream_created)
        first = False
        for _ in range(expected):
            await call.read()

    async def close() -> None:
        call.cancel()
        await channel.close()

    return Session(exchange, close)


async def ws_session(target: str, service: str) -> Session:
    socket = await connect(f"ws://{target}", compression=None, max_size=2**22)
    await socket.send(json.dumps({"type": "config", "service": service, "sample_rate": RATE}))
    text = json.dumps({"type": "text", "id": "s", "text": "hello there"})

    async def asr_exchange() -> None:
        await socket.send(FRAME)
        json.loads(await socket.recv())

    async def tts_exchange() -> None:
        await socket.send(text)
        for _ in range(TTS_CHUNKS):
            await socket.recv()
        json.loads(await socket.recv())

    return Session(asr_exchange if service == "asr" else tts_exchange, socket.close)


async def inprocess_session(service: str) -> Session:
    if service == "tts":
        engine = ZeroWorkTtsEngine()
        job = SynthesisJob("hello there", VOICE, "en", SynthesisMode.STREAM)

        async def tts_exchange() -> None:
            async for chunk in engine.synthesize(job):
                float_to_pcm16(chunk)

        async def nothing() -> None:
            return None

        return Session(tts_exchange, nothing)
    events: StreamQueue[RecognizerEvent] = StreamQueue(64)
    results = ZeroWorkAsrEngine().recognize(OPTIONS, events)

    async def asr_exchange() -> None:
        await events.put(AudioEvent(pcm16_to_float(FRAME)))
        await anext(results)

    async def close() -> None:
        events.close()
        await results.aclose()

    return Session(asr_exchange, close)


# ---- measurement --------------------------------------------------------------------------------


@dataclass
class PathResult:
    """Figures of one service over one transport."""

    service: str
    transport: str
    latency_ms: Summary
    messages_per_s: float
    messages_per_cpu_s: float  # server-side CPU (the client's own for inprocess)
    streams_per_core: float  # real-time streams (50 messages/s each) one core would carry


async def measure(
    service: str,
    transport: str,
    open_session: Callable[[], Awaitable[Session]],
    server: psutil.Process | None,
    frames: int,
    streams: int,
) -> PathResult:
    """Ping-pong latency on one stream, then pipelined throughput on `streams` streams."""
    session = await open_session()
    for _ in range(min(200, frames)):  # warm up
        await session.exchange()
    latencies = []
    for _ in range(frames):
        started = time.perf_counter()
        await session.exchange()
        latencies.append(1000 * (time.perf_counter() - started))
    await session.close()

    sessions = [await open_session() for _ in range(streams)]
    per_stream = max(1, frames // streams) * 2
    cpu_process = server or psutil.Process()
    cpu_before = sum(cpu_process.cpu_times()[:2])
    started = time.perf_counter()

    async def drive(session: Session) -> None:
        for _ in range(per_stream):
            await session.exchange()

    await asyncio.gather(*(drive(s) for s in sessions))
    elapsed = time.perf_counter() - started
    cpu = sum(cpu_process.cpu_times()[:2]) - cpu_before
    for session in sessions:
        await session.close()
    # For TTS one exchange carries TTS_CHUNKS audio messages out; count messages, not exchanges.
    messages = per_stream * streams * (TTS_CHUNKS if service == "tts" else 1)
    per_cpu = messages / cpu if cpu > 0 else float("nan")
    return PathResult(
        service, transport, Summary.of(latencies), messages / elapsed, per_cpu, per_cpu / 50
    )


async def start_server(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start `python -m loadtest.transport serve ...`; returns it and its target."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.transport",
        "serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    if not line.startswith("READY"):
        process.kill()
        raise RuntimeError(f"benchmark server did not start: {line!r}")
    return process, f"127.0.0.1:{line.split()[1]}"


async def run(frames: int, streams: int) -> list[PathResult]:
    """Measure every (service, transport) pair."""
    results = []
    for service in ("asr", "tts"):
        frames_here = frames if service == "asr" else max(1, frames // 5)
        grpc_server, grpc_target = await start_server("grpc", service)
        bare_server, bare_target = await start_server("grpc-bare")
        ws_server, ws_target = await start_server("websocket")
        opener = grpc_asr_session if service == "asr" else grpc_tts_session
        servers = (grpc_server, bare_server, ws_server)
        try:
            paths: list[tuple[str, Callable[[], Awaitable[Session]], psutil.Process | None]] = [
                ("grpc", lambda o=opener, t=grpc_target: o(t), psutil.Process(grpc_server.pid)),
                (
                    "grpc-bare",
                    lambda o=opener, t=bare_target: o(t),
                    psutil.Process(bare_server.pid),
                ),
                (
                    "websocket",
                    lambda s=service, t=ws_target: ws_session(t, s),
                    psutil.Process(ws_server.pid),
                ),
                ("inprocess", lambda s=service: inprocess_session(s), None),
            ]
            for transport, open_session, process in paths:
                results.append(
                    await measure(service, transport, open_session, process, frames_here, streams)
                )
        finally:
            for process in servers:
                process.kill()
                await process.wait()
    return results


def report(results: list[PathResult]) -> str:
    """The side-by-side table and the ratios."""
    rows = [
        (
            r.service,
            r.transport,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.messages_per_s,
            r.messages_per_cpu_s,
            r.streams_per_core,
        )
        for r in results
    ]
    text = table(
        rows, ("service", "transport", "p50 ms", "p99 ms", "msg/s", "msg/cpu-s", "streams/core")
    )
    lines = [text, ""]
    for service in ("asr", "tts"):
        by = {r.transport: r for r in results if r.service == service}
        g, b, w, d = by["grpc"], by["grpc-bare"], by["websocket"], by["inprocess"]
        lines.append(
            f"{service}: gRPC p50 {g.latency_ms.p50 - d.latency_ms.p50:+.3f} ms over the direct "
            f"call (of which our protocol layer {g.latency_ms.p50 - b.latency_ms.p50:+.3f} ms); "
            f"{g.latency_ms.p50 / w.latency_ms.p50:.2f}x the WebSocket p50 "
            f"(bare grpc.aio {b.latency_ms.p50 / w.latency_ms.p50:.2f}x); "
            f"{g.messages_per_cpu_s / w.messages_per_cpu_s:.2f}x the WebSocket messages per "
            "server CPU-second"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    server = sub.add_parser("serve", help="(internal) run one benchmark server")
    server.add_argument("transport", choices=("grpc", "grpc-bare", "websocket"))
    server.add_argument("service", nargs="?", choices=("asr", "tts"), default="asr")
    parser.add_argument("--frames", type=int, default=2000, help="ping-pong exchanges per path")
    parser.add_argument("--streams", type=int, default=8, help="concurrent pipelined streams")
    parser.add_argument("--json", type=Path, default=Path("artifacts/transport.json"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.transport == "grpc":
            asyncio.run(serve_grpc(args.service))
        elif args.transport == "grpc-bare":
            asyncio.run(serve_bare_grpc())
        else:
            asyncio.run(serve_websocket())
        return 0
    results = asyncio.run(run(args.frames, args.streams))
    print(report(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

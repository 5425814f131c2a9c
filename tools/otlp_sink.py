"""An OTLP/gRPC trace receiver that appends what it receives to a file, for CI's container check.

Jaeger's image cannot be pulled where CI runs, so tools/ci-containers.sh puts this in its place
(deploy/compose.ci.yaml): the servers and the bot export over OTLP/gRPC exactly as they do to
Jaeger, and each ExportTraceServiceRequest becomes one JSON line, the format of
NEMOTRON_TRACE_FILE, which `nemotron-speech trace-report` reads.

    python tools/otlp_sink.py --port 4317 --out /traces/spans.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToJson
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class FileSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Appends every export request to `path` as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Write one request; a batch is one write call, so lines never interleave."""
        line = MessageToJson(request, indent=None) + "\n"
        await asyncio.to_thread(self._append, line)
        return trace_service_pb2.ExportTraceServiceResponse()

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line)


async def serve(port: int, path: Path) -> None:
    """Serve on all interfaces until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(FileSink(path), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"0.0.0.0:{port}")
    await server.start()
    print(f"otlp_sink: OTLP/gRPC on port {port}, spans to {path}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=5)


def main() -> None:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4317)
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file to append to")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.touch()
    asyncio.run(serve(args.port, args.out))


if __name__ == "__main__":
    main()

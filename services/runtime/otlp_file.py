"""A span exporter that appends OTLP JSON (one ExportTraceServiceRequest per line) to a file.

This is the "file exporter option" behind NEMOTRON_TRACE_FILE: the same encoding an OTLP/HTTP
JSON collector receives, readable by `nemotron-speech trace-report` without Jaeger.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.json_format import MessageToJson
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class OtlpJsonFileExporter(SpanExporter):
    """Appends each batch as one JSON line; safe to share one file between processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write one batch."""
        line = MessageToJson(encode_spans(spans), indent=None) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write(line)  # one write call per batch: appends from several processes interleave
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""

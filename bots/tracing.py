"""The adapters' client spans: children of Pipecat's turn span, parents of the servers' spans.

Off unless the standard OTEL_* variables turn tracing on (as for the servers); off means no
provider, no spans and no context in the messages. When on, each unit of work (a finalize, an
LLM request, a TTS segment) gets a CLIENT span under the current turn, and its W3C context travels
to the server in gRPC metadata (the gRPC client instrumentation) and in the message's
`trace_context` field (the ASR and TTS calls outlive a turn, so their metadata cannot carry it).
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import Span, SpanKind

from services.runtime.telemetry import Telemetry, configure_telemetry, flush_telemetry
from services.runtime.trace_types import ATTR_TTFB_MS

_telemetry: Telemetry | None = None

#: Where a client finds a trace: Jaeger's UI, as `docker compose up` serves it.
TRACE_UI_ENV = "NEMOTRON_TRACE_UI"
DEFAULT_TRACE_UI = "http://localhost:16686"


def configure_bot_tracing() -> Telemetry:
    """Set up tracing for a bot process from OTEL_* (once); instrument gRPC clients when on."""
    global _telemetry
    if _telemetry is None:
        _telemetry = configure_telemetry("nemotron-bot")
        if _telemetry.enabled:
            from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient

            GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]
    return _telemetry


def tracing_on() -> bool:
    """Whether this process records spans (configure_bot_tracing ran and OTEL_* asked for it)."""
    return _telemetry is not None and _telemetry.enabled


def content_on() -> bool:
    """Whether transcripts and replies may go into spans and logs (NEMOTRON_TRACE_CONTENT)."""
    return _telemetry is not None and _telemetry.record_content


def flush_bot_tracing() -> None:
    """Export what is still batched (before a short-lived process such as `talk` exits)."""
    if _telemetry is not None and _telemetry.enabled:
        flush_telemetry()


class ClientSpans:
    """Starts an adapter's spans under the turn that Pipecat's turn tracing has open."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded at all (checked before any span work)."""
        return tracing_on()

    def start(self, name: str, **attributes: Any) -> Span | None:
        """A CLIENT span under the current turn (or the conversation); None when off."""
        if not self.enabled:
            return None
        assert _telemetry is not None
        tracing = getattr(self._processor, "_tracing_context", None)
        parent = None
        if tracing is not None:
            parent = tracing.get_turn_context() or tracing.get_conversation_context()
        return _telemetry.tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )

    @staticmethod
    def carrier(span: Span | None) -> dict[str, str]:
        """The span's W3C headers, for a message's `trace_context` or gRPC metadata."""
        carrier: dict[str, str] = {}
        if span is not None:
            inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    @staticmethod
    def end(span: Span | None, ttfb_ms: float | None = None, **attributes: Any) -> None:
        """End the span with its time to first byte."""
        if span is None:
            return
        if ttfb_ms is not None:
            span.set_attribute(ATTR_TTFB_MS, ttfb_ms)
        if attributes:
            span.set_attributes(attributes)
        span.end()


def trace_link(span: Span) -> dict[str, str]:
    """Where `span`'s trace is in the trace UI ($NEMOTRON_TRACE_UI), with the span picked out.

    The RTVI server message (type "trace") that lets the browser client link a turn to its trace.
    """
    context = span.get_span_context()
    trace_id = format(context.trace_id, "032x")
    base = os.environ.get(TRACE_UI_ENV, DEFAULT_TRACE_UI).rstrip("/")
    return {
        "type": "trace",
        "trace_id": trace_id,
        "url": f"{base}/trace/{trace_id}?uiFind={context.span_id:016x}",
    }

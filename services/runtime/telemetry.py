"""OpenTelemetry for the servers: off unless the standard OTEL_* variables turn it on.

- Traces go to OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, or when
  `OTEL_TRACES_EXPORTER` names an exporter; `NEMOTRON_TRACE_FILE=path` also writes OTLP JSON lines
  (what `nemotron-speech trace-report` reads). Sampling follows `OTEL_TRACES_SAMPLER`; the
  service name `OTEL_SERVICE_NAME`.
- Metrics (the TTFB histograms, and the gauges of active and allowed streams that autoscalers
  read) are served for Prometheus on `NEMOTRON_PROMETHEUS_PORT`, bound to
  `NEMOTRON_PROMETHEUS_HOST` (default 127.0.0.1; 0.0.0.0 in a pod, for the cluster's Prometheus).
- When nothing is set no provider, exporter or instrumentation is created, and `Telemetry.enabled`
  is False: the servicers skip every span, so tracing costs nothing on the hot path.
- Transcripts and prompts become span attributes only with `NEMOTRON_TRACE_CONTENT=true`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


def tracing_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for trace export."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").lower() in _TRUE:
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("NEMOTRON_TRACE_FILE")
    )


@dataclass
class Telemetry:
    """What a server records. `enabled` (spans or metrics are on) is checked before any work."""

    enabled: bool = False
    record_content: bool = False
    tracer: Tracer = field(default_factory=lambda: trace.NoOpTracer())
    histograms: dict[str, Any] = field(default_factory=dict)

    def record_ttfb(self, metric: str, milliseconds: float, attributes: dict[str, str]) -> None:
        """Add a TTFB sample to its histogram (when metrics are on)."""
        histogram = self.histograms.get(metric)
        if histogram is not None:
            histogram.record(milliseconds, attributes)

    def span_between(
        self,
        name: str,
        started_perf: float,
        ended_perf: float,
        attributes: dict[str, Any],
        parent: otel_context.Context | None = None,
    ) -> Span:
        """Record a finished span from two perf_counter() readings (no span is held open)."""
        span = self.tracer.start_span(
            name, context=parent, start_time=epoch_ns(started_perf), attributes=attributes
        )
        span.end(end_time=epoch_ns(ended_perf))
        return span


def epoch_ns(perf: float) -> int:
    """A perf_counter() reading as wall-clock nanoseconds since the epoch (span timestamps)."""
    return time.time_ns() - round((time.perf_counter() - perf) * 1e9)


def context_from(carrier: Mapping[str, str]) -> otel_context.Context | None:
    """The parent context carried in a message's trace_context map, if any."""
    if not carrier:
        return None
    return extract(dict(carrier))


def current_trace_context() -> dict[str, str]:
    """The current span's W3C headers, for a message's trace_context map."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


_configured: Telemetry | None = None

#: What the stream gauges read at each scrape: (service name, active streams, allowed streams).
StreamCounts = Callable[[], tuple[str, int, int]]
_stream_counts: list[StreamCounts] = []


def observe_streams(counts: StreamCounts) -> Callable[[], None]:
    """Report a server's active and allowed streams on the stream gauges at every scrape.

    One pair of gauges per process serves every server in it, labelled by service name.
    Returns the function that stops reporting them (when the server stops).
    """
    _stream_counts.append(counts)
    return lambda: _stream_counts.remove(counts)


def configure_telemetry(
    default_service_name: str, env: Mapping[str, str] = os.environ
) -> Telemetry:
    """Set up tracing and metrics once per process, as the environment asks."""
    global _configured
    if _configured is not None:
        return _configured
    telemetry = Telemetry(record_content=env.get("NEMOTRON_TRACE_CONTENT", "").lower() in _TRUE)
    resource = None
    if tracing_requested(env) or env.get("NEMOTRON_PROMETHEUS_PORT"):
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource

        name = env.get("OTEL_SERVICE_NAME") or default_service_name
        resource = Resource.create({SERVICE_NAME: name})
    if tracing_requested(env):
        _configure_tracing(telemetry, resource, env)
    if env.get("NEMOTRON_PROMETHEUS_PORT"):
        _configure_metrics(telemetry, resource, int(env["NEMOTRON_PROMETHEUS_PORT"]))
    _configured = telemetry
    return telemetry


def _configure_tracing(telemetry: Telemetry, resource: Any, env: Mapping[str, str]) -> None:
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer, filters
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter_name in ("", "otlp") and (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or exporter_name == "otlp"
    ):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    if path := env.get("NEMOTRON_TRACE_FILE"):
        from services.runtime.otlp_file import OtlpJsonFileExporter

        provider.add_span_processor(BatchSpanProcessor(OtlpJsonFileExporter(path)))
    trace.set_tracer_provider(provider)
    # Health is not traced: probes would flood the traces, and the instrumentation's stream
    # wrapper breaks grpcio-health's Watch (a coroutine that writes, not an async generator:
    # UNKNOWN "'async for' requires an object with __aiter__"), which readiness waits
    # (clients.serving.wait_serving) are built on.
    untraced_health = filters.negate(filters.health_check())
    GrpcAioInstrumentorServer(filter_=untraced_health).instrument()  # type: ignore[no-untyped-call]
    telemetry.enabled = True
    telemetry.tracer = provider.get_tracer("nemotron.speech")
    log.info("tracing on (%s)", exporter_name or "otlp")


def _configure_metrics(telemetry: Telemetry, resource: Any, port: int) -> None:
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    from services.runtime import trace_types as names

    host = os.environ.get("NEMOTRON_PROMETHEUS_HOST", "127.0.0.1")
    metrics_server, _thread = start_http_server(port, addr=host)
    provider = MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()])
    metrics.set_meter_provider(provider)
    meter = provider.get_meter("nemotron.speech")
    for metric in (names.METRIC_ASR_TTFB, names.METRIC_TTS_TTFB, names.METRIC_LLM_TTFB):
        telemetry.histograms[metric] = meter.create_histogram(
            metric, unit="ms", description="time to first byte of the stage"
        )
    # The autoscaler's signal (Kubernetes HPA through prometheus-adapter): streams held now, and
    # the limit beyond which a replica refuses new ones.
    meter.create_observable_gauge(
        names.METRIC_STREAMS_ACTIVE,
        callbacks=[_streams_observer(active=True)],
        description="streams open now (each holds one of --max-streams slots)",
    )
    meter.create_observable_gauge(
        names.METRIC_STREAMS_MAX,
        callbacks=[_streams_observer(active=False)],
        description="streams allowed at once (--max-streams); more are refused",
    )
    telemetry.enabled = True  # with tracing off, the tracer stays a no-op
    # The bound port, which port 0 (any free one) only tells here.
    log.info("Prometheus metrics on %s:%d/metrics", host, metrics_server.server_port)


def _streams_observer(active: bool) -> Callable[[Any], Iterable[Any]]:
    from opentelemetry.metrics import Observation

    def observe(_options: Any) -> Iterable[Any]:
        for counts in _stream_counts:
            service, streams, capacity = counts()
            yield Observation(streams if active else capacity, {"grpc_service": service})

    return observe


def flush_telemetry() -> None:
    """Export spans still in the batch processors (on server shutdown; exit flushes too)."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "force_flush", None)
    if callable(flush):
        flush()

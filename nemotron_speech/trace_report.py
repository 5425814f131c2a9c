"""`nemotron-speech trace-report`: per-stage and end-to-end TTFB from traces, without Jaeger's UI.

Reads spans from an OTLP JSON file (what NEMOTRON_TRACE_FILE writes) or from Jaeger's query API,
groups them into turns (one trace per turn), and prints p50/p95/max of each stage's time to first
byte and of the end-to-end latency (finalize received -> first reply audio), plus a PNG timeline
of one conversation turn's stages.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.runtime import trace_types as names

STAGES = (
    ("asr", names.SPAN_ASR_FINALIZE),
    ("llm", names.SPAN_LLM_REQUEST),
    ("tts", names.SPAN_TTS_SEGMENT),
)
STAGE_NAMES = frozenset(name for _, name in STAGES)


@dataclass(frozen=True)
class SpanRecord:
    """A span from any source, in one shape."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        """Length of the span."""
        return (self.end_ns - self.start_ns) / 1e6


@dataclass
class Turn:
    """The spans of one trace, and what they say about latency."""

    trace_id: str
    spans: list[SpanRecord]

    def first(self, name: str) -> SpanRecord | None:
        """The earliest span called `name`."""
        matching = [s for s in self.spans if s.name == name]
        return min(matching, key=lambda s: s.start_ns) if matching else None

    def ttfb_ms(self, name: str) -> float | None:
        """The ttfb_ms attribute of the first `name` span."""
        span = self.first(name)
        value = span.attributes.get(names.ATTR_TTFB_MS) if span else None
        return float(value) if value is not None else None

    def stage_spans(self) -> list[SpanRecord]:
        """The spans of the stages (asr.finalize, llm.request, tts.segment), in start order."""
        return sorted(
            (s for s in self.spans if s.name in STAGE_NAMES), key=lambda s: (s.start_ns, -s.end_ns)
        )

    @property
    def is_conversation_turn(self) -> bool:
        """Whether the trace holds every stage, as a user's turn does.

        A stream's own RPC trace can hold a stage span too (a soft finalize carries no turn's
        context, so its asr.finalize lands under the StreamingRecognize call), yet it is no turn.
        """
        return STAGE_NAMES <= {s.name for s in self.spans}

    def end_to_end_ms(self) -> float | None:
        """Finalize received by ASR -> first reply audio sent by TTS."""
        finalize, segment = self.first(names.SPAN_ASR_FINALIZE), self.first(names.SPAN_TTS_SEGMENT)
        ttfb = self.ttfb_ms(names.SPAN_TTS_SEGMENT)
        if finalize is None or segment is None or ttfb is None:
            return None
        return (segment.start_ns - finalize.start_ns) / 1e6 + ttfb


def _otlp_value(value: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    if "arrayValue" in value:
        return [_otlp_value(v) for v in value["arrayValue"].get("values", [])]
    return None


def _hex(identifier: str) -> str:
    # Protobuf JSON writes bytes as base64; OTLP/HTTP JSON writes them as hex. Accept both.
    if not identifier:
        return ""
    try:
        int(identifier, 16)
        return identifier.lower()
    except ValueError:
        return base64.b64decode(identifier).hex()


def spans_from_otlp_json(lines: Iterable[str]) -> list[SpanRecord]:
    """Spans from OTLP JSON, one ExportTraceServiceRequest per line."""
    spans = []
    for line in lines:
        if not line.strip():
            continue
        for resource_spans in json.loads(line).get("resourceSpans", []):
            resource = {
                a["key"]: _otlp_value(a["value"])
                for a in resource_spans.get("resource", {}).get("attributes", [])
            }
            service = str(resource.get("service.name", "?"))
            for scope in resource_spans.get("scopeSpans", []):
                for span in scope.get("spans", []):
                    spans.append(
                        SpanRecord(
                            trace_id=_hex(span["traceId"]),
                            span_id=_hex(span["spanId"]),
                            parent_id=_hex(span.get("parentSpanId", "")),
                            name=span["name"],
                            service=service,
                            start_ns=int(span["startTimeUnixNano"]),
                            end_ns=int(span["endTimeUnixNano"]),
                            attributes={
                                a["key"]: _otlp_value(a["value"])
                                for a in span.get("attributes", [])
                            },
                        )
                    )
    return spans


def spans_from_jaeger(url: str, services: Sequence[str], limit: int) -> list[SpanRecord]:
    """Spans of recent traces from Jaeger's query API (e.g. http://localhost:16686)."""
    spans: dict[str, SpanRecord] = {}
    for service in services:
        query = urllib.parse.urlencode({"service": service, "limit": limit})
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/traces?{query}", timeout=30) as reply:
            document = json.load(reply)
        for trace_data in document.get("data", []):
            processes = trace_data.get("processes", {})
            for span in trace_data.get("spans", []):
                parents = [
                    r["spanID"]
                    for r in span.get("references", [])
                    if r.get("refType") == "CHILD_OF"
                ]
                start_ns = int(span["startTime"]) * 1000
                spans[span["spanID"]] = SpanRecord(
                    trace_id=span["traceID"],
                    span_id=span["spanID"],
                    parent_id=parents[0] if parents else "",
                    name=span["operationName"],
                    service=processes.get(span.get("processID"), {}).get("serviceName", "?"),
                    start_ns=start_ns,
                    end_ns=start_ns + int(span["duration"]) * 1000,
                    attributes={t["key"]: t["value"] for t in span.get("tags", [])},
                )
    return list(spans.values())


def turns_of(spans: Iterable[SpanRecord]) -> list[Turn]:
    """Traces that hold at least one stage span, oldest first."""
    by_trace: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    stage_names = {name for _, name in STAGES}
    turns = [
        Turn(trace_id, group)
        for trace_id, group in by_trace.items()
        if any(s.name in stage_names for s in group)
    ]
    return sorted(turns, key=lambda t: min(s.start_ns for s in t.spans))


def conversation_turns(turns: list[Turn]) -> list[Turn]:
    """The turns that hold every stage, in the order their stages began.

    When there is none (a recording of one server alone), every turn is one.
    """
    chosen = [t for t in turns if t.is_conversation_turn] or turns
    return sorted(chosen, key=lambda t: t.stage_spans()[0].start_ns)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(turns: list[Turn]) -> dict[str, dict[str, float]]:
    """count/p50/p95/max per stage TTFB and end to end, in ms."""
    series: dict[str, list[float]] = {stage: [] for stage, _ in STAGES}
    series["end_to_end"] = []
    for turn in turns:
        for stage, name in STAGES:
            if (value := turn.ttfb_ms(name)) is not None:
                series[stage].append(value)
        if (value := turn.end_to_end_ms()) is not None:
            series["end_to_end"].append(value)
    return {
        stage: {
            "count": len(v),
            "p50": _percentile(v, 50),
            "p95": _percentile(v, 95),
            "max": max(v),
        }
        for stage, v in series.items()
        if v
    }


def format_summary(figures: dict[str, dict[str, float]], turns: int) -> str:
    """The terminal table."""
    lines = [
        f"{turns} turns",
        f"{'stage':<11} {'count':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}",
    ]
    for stage, f in figures.items():
        lines.append(
            f"{stage:<11} {int(f['count']):>5} {f['p50']:>8.1f} {f['p95']:>8.1f} {f['max']:>8.1f}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Bar:
    """One row of a turn's timeline, in milliseconds since the turn's first stage began."""

    label: str
    service: str
    start_ms: float
    length_ms: float
    ttfb_ms: float | None


def timeline(turn: Turn) -> list[Bar]:
    """The rows of `turn`'s timeline: its stage spans only, in start order.

    The trace's other spans (the bot's turn and client spans) can stretch far beyond the stages
    and would shrink them to slivers, so they are left out.
    """
    spans = turn.stage_spans()
    origin = spans[0].start_ns if spans else 0
    bars = []
    for span in spans:
        ttfb = span.attributes.get(names.ATTR_TTFB_MS)
        bars.append(
            Bar(
                label=f"{span.service}: {span.name}",
                service=span.service,
                start_ms=(span.start_ns - origin) / 1e6,
                length_ms=span.duration_ms,
                ttfb_ms=float(ttfb) if ttfb is not None else None,
            )
        )
    return bars


def plot_timeline(turn: Turn, path: Path) -> None:
    """A Gantt chart of one turn's stage spans, with each stage's first byte marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = timeline(turn)
    figure, axes = plt.subplots(figsize=(10, 0.35 * len(bars) + 1.5))
    for row, bar in enumerate(bars):
        axes.barh(
            row,
            max(bar.length_ms, 0.5),
            left=bar.start_ms,
            height=0.6,
            color=f"C{hash(bar.service) % 10}",
        )
        if bar.ttfb_ms is not None:
            axes.plot([bar.start_ms + bar.ttfb_ms], [row], marker="|", markersize=14, color="black")
    axes.set_yticks(range(len(bars)), [bar.label for bar in bars], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("milliseconds since the turn's first stage began (| = first byte)")
    axes.set_title(f"turn {turn.trace_id[:8]}")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_trace_report_parser(subparsers: Any) -> None:
    """Add `trace-report`."""
    parser = subparsers.add_parser(
        "trace-report", help="TTFB per stage and end to end, from an OTLP JSON file or Jaeger"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="OTLP JSON lines (NEMOTRON_TRACE_FILE)")
    source.add_argument("--jaeger", help="Jaeger query URL, e.g. http://localhost:16686")
    parser.add_argument(
        "--service", action="append", help="Jaeger services to read (default: the three servers)"
    )
    parser.add_argument("--limit", type=int, default=200, help="traces per service from Jaeger")
    parser.add_argument(
        "--png",
        type=Path,
        default=Path("artifacts/turn-timeline.png"),
        help="where to draw one turn's timeline",
    )
    parser.add_argument(
        "--turn",
        type=int,
        default=-1,
        help="which conversation turn to draw (index, oldest 0; default -1, the last)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run_trace_report(args: argparse.Namespace) -> int:
    """Read, summarise, draw; returns the exit code."""
    if args.file is not None:
        spans = spans_from_otlp_json(args.file.read_text().splitlines())
    else:
        services = args.service or ["nemotron-asr", "nemotron-tts", "nemotron-llm"]
        spans = spans_from_jaeger(args.jaeger, services, args.limit)
    turns = turns_of(spans)
    if not turns:
        print("no turns found (no asr.finalize, llm.request or tts.segment spans)")
        return 1
    figures = summary(turns)
    print(json.dumps(figures, indent=2) if args.json else format_summary(figures, len(turns)))
    drawable = conversation_turns(turns)
    if not -len(drawable) <= args.turn < len(drawable):
        print(f"--turn {args.turn} is out of range: there are {len(drawable)} conversation turns")
        return 2
    turn = drawable[args.turn]
    plot_timeline(turn, args.png)
    print(f"timeline of turn {turn.trace_id[:8]}: {args.png}")
    return 0

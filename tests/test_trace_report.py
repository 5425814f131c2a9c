"""trace-report's choice of the turn to draw, and what its timeline holds.

The recording is what a real conversation leaves: each turn is a trace with the bot's spans and the
three stage spans beneath them, and the ASR call's own RPC trace runs the whole conversation and
holds the soft finalizes (they carry no turn's context), so it has a stage span but is no turn.
"""

from __future__ import annotations

import argparse
import json
from itertools import count
from pathlib import Path

from nemotron_speech.trace_report import (
    STAGE_NAMES,
    SpanRecord,
    conversation_turns,
    run_trace_report,
    spans_from_otlp_json,
    timeline,
    turns_of,
)
from services.runtime import trace_types as names

MS = 1_000_000
_ids = count(1)


def _span(
    trace: str, name: str, start_ms: int, length_ms: int, service: str, ttfb: float | None = None
) -> SpanRecord:
    return SpanRecord(
        trace_id=trace,
        span_id=f"{next(_ids):016x}",
        parent_id="",
        name=name,
        service=service,
        start_ns=start_ms * MS,
        end_ns=(start_ms + length_ms) * MS,
        attributes={} if ttfb is None else {names.ATTR_TTFB_MS: ttfb},
    )


def _turn(trace: str, at_ms: int) -> list[SpanRecord]:
    """One user turn: the bot's spans, which outlast the stages, and the three stage spans."""
    return [
        _span(trace, names.SPAN_TURN, at_ms - 4000, 9000, "bot"),
        _span(trace, names.SPAN_BOT_STT, at_ms - 3000, 3400, "bot"),
        _span(trace, names.SPAN_ASR_FINALIZE, at_ms, 300, "nemotron-asr", 300.0),
        _span(trace, names.SPAN_LLM_REQUEST, at_ms + 310, 900, "nemotron-llm", 180.0),
        _span(trace, names.SPAN_LLM_CHUNK, at_ms + 320, 200, "nemotron-llm"),
        _span(trace, names.SPAN_TTS_SEGMENT, at_ms + 500, 600, "nemotron-tts", 90.0),
    ]


def _conversation() -> list[SpanRecord]:
    # The ASR stream was reopened after the first turn, so its RPC trace begins after every turn's
    # first span: it is the trace that begins last, and it lasts 27 s.
    stream = "c" * 32
    return [
        *_turn("a" * 32, 10_000),
        *_turn("b" * 32, 20_000),
        _span(stream, "/nemotron.speech.v1.AsrService/StreamingRecognize", 16_500, 27_000, "asr"),
        _span(stream, names.SPAN_ASR_STREAM, 16_501, 26_998, "nemotron-asr"),
        _span(stream, names.SPAN_ASR_FINALIZE, 30_000, 40, "nemotron-asr", 40.0),
    ]


def _otlp_json(spans: list[SpanRecord]) -> str:
    """The spans as one ExportTraceServiceRequest line, as NEMOTRON_TRACE_FILE holds them."""
    by_service: dict[str, list[SpanRecord]] = {}
    for span in spans:
        by_service.setdefault(span.service, []).append(span)
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [{"key": "service.name", "value": {"stringValue": service}}]
                    },
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": s.trace_id,
                                    "spanId": s.span_id,
                                    "name": s.name,
                                    "startTimeUnixNano": str(s.start_ns),
                                    "endTimeUnixNano": str(s.end_ns),
                                    "attributes": [
                                        {"key": key, "value": {"doubleValue": value}}
                                        for key, value in s.attributes.items()
                                    ],
                                }
                                for s in group
                            ]
                        }
                    ],
                }
                for service, group in by_service.items()
            ]
        }
    )


def test_a_stream_trace_with_a_stage_span_is_no_conversation_turn():
    turns = turns_of(_conversation())
    assert turns[-1].trace_id == "c" * 32  # what used to be drawn as "the last turn"
    assert [t.trace_id for t in conversation_turns(turns)] == ["a" * 32, "b" * 32]


def test_the_last_conversation_turn_is_drawn_over_its_stage_spans_only():
    (*_, last) = conversation_turns(turns_of(_conversation()))
    assert last.trace_id == "b" * 32
    # Finalize received -> LLM done, 1.2 s: not the bot's 9 s turn span, nor the conversation.
    assert [(bar.label, bar.start_ms, bar.length_ms, bar.ttfb_ms) for bar in timeline(last)] == [
        (f"nemotron-asr: {names.SPAN_ASR_FINALIZE}", 0, 300, 300.0),
        (f"nemotron-llm: {names.SPAN_LLM_REQUEST}", 310, 900, 180.0),
        (f"nemotron-tts: {names.SPAN_TTS_SEGMENT}", 500, 600, 90.0),
    ]


def test_without_a_whole_turn_every_trace_with_a_stage_can_be_drawn():
    llm_only = [_span(f"{i:032x}", names.SPAN_LLM_REQUEST, 1000 * i, 500, "llm") for i in (2, 1)]
    drawable = conversation_turns(turns_of(llm_only))
    assert [t.trace_id for t in drawable] == [f"{1:032x}", f"{2:032x}"]
    assert all(t.stage_spans()[0].name in STAGE_NAMES for t in drawable)


def test_the_cli_draws_the_last_conversation_turn(tmp_path, capsys):
    recorded = tmp_path / "traces.jsonl"
    recorded.write_text(_otlp_json(_conversation()) + "\n")
    assert len(spans_from_otlp_json(recorded.read_text().splitlines())) == 15
    png = tmp_path / "turn.png"
    args = argparse.Namespace(file=recorded, json=False, png=png, turn=-1)
    assert run_trace_report(args) == 0
    assert f"timeline of turn {'b' * 8}: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"
    args.turn = 0
    assert run_trace_report(args) == 0
    assert f"timeline of turn {'a' * 8}" in capsys.readouterr().out


def test_a_turn_index_out_of_range_is_refused(tmp_path: Path, capsys):
    recorded = tmp_path / "traces.jsonl"
    recorded.write_text(_otlp_json(_conversation()) + "\n")
    args = argparse.Namespace(file=recorded, json=False, png=tmp_path / "t.png", turn=2)
    assert run_trace_report(args) == 2
    assert "2 conversation turns" in capsys.readouterr().out
    assert not (tmp_path / "t.png").exists()

"""The bot's RTVI processor answers the browser client's `interrupt` message."""

from __future__ import annotations

from typing import Any

import pytest
from pipecat.frames.frames import (
    InputTransportMessageFrame,
    InterruptionFrame,
    OutputTransportMessageUrgentFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from bots.rtvi import INTERRUPT, client_rtvi, observer_params

pytestmark = pytest.mark.timeout(30)


def client_message(kind: str) -> InputTransportMessageFrame:
    return InputTransportMessageFrame(
        message={"label": "rtvi-ai", "type": "client-message", "id": "m1", "data": {"t": kind}}
    )


async def answers_to(kind: str) -> tuple[list[Any], list[type]]:
    """The RTVI messages the processor sends for client message `kind`, and the frame types."""
    rtvi = client_rtvi()
    down, up = await run_test(
        rtvi,
        frames_to_send=[client_message(kind), SleepFrame(0.3)],
        observers=[rtvi.create_rtvi_observer(params=observer_params())],
    )
    frames = [*down, *up]
    sent = [f.message for f in frames if isinstance(f, OutputTransportMessageUrgentFrame)]
    return sent, [type(f) for f in frames]


async def test_interrupt_message_interrupts_the_bot_and_is_answered():
    sent, kinds = await answers_to(INTERRUPT)
    assert InterruptionFrame in kinds
    responses = [m for m in sent if m["type"] == "server-response"]
    assert [(m["id"], m["data"]) for m in responses] == [
        ("m1", {"t": INTERRUPT, "d": {"interrupted": True}})
    ]
    assert "bot-interrupted" in [m["type"] for m in sent]


async def test_unknown_client_message_is_refused_without_interrupting():
    sent, kinds = await answers_to("dance")
    assert InterruptionFrame not in kinds
    assert [m["type"] for m in sent if m["type"] == "error-response"] == ["error-response"]


def test_a_traced_turn_is_linked_to_its_trace_in_the_trace_ui(monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider

    from bots.tracing import DEFAULT_TRACE_UI, TRACE_UI_ENV, trace_link

    span = TracerProvider().get_tracer("test").start_span("turn")
    context = span.get_span_context()
    trace_id, span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"

    monkeypatch.delenv(TRACE_UI_ENV, raising=False)
    link = trace_link(span)
    assert link == {
        "type": "trace",
        "trace_id": trace_id,
        "url": f"{DEFAULT_TRACE_UI}/trace/{trace_id}?uiFind={span_id}",
    }
    monkeypatch.setenv(TRACE_UI_ENV, "https://traces.example.internal/jaeger/")
    assert trace_link(span)["url"] == (
        f"https://traces.example.internal/jaeger/trace/{trace_id}?uiFind={span_id}"
    )

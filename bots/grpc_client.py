"""What the three adapters share on the client side of the mesh: channels, backoff, trace context.

Clients retry only UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED, with jittered
exponential backoff; everything else is a bug in the request and is reported, not retried.
"""

from __future__ import annotations

import random

import grpc

from services.runtime.telemetry import current_trace_context

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

#: The servers' default message bound; audio chunks are far smaller.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel to a loopback or private-network target, with bounded messages.

    Keepalive pings let a client notice a server that vanished without closing its sockets; the
    channel's own reconnect backoff is capped at 5 s (gRPC's default grows to 120 s), so a server
    back from a long outage is found as soon as our own `Backoff` asks again.
    """
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ],
    )


def is_retryable(error: BaseException) -> bool:
    """Whether a failed call is worth trying again (the server is down, busy or slow)."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in RETRYABLE
    return isinstance(error, TimeoutError | ConnectionError)


def describe(error: BaseException) -> str:
    """One line a person can act on, for logs and ErrorFrames."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, TimeoutError):
        return "no answer within the deadline (server stalled or overloaded)"
    return f"{type(error).__name__}: {error}"


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's W3C trace context as gRPC metadata (empty when tracing is off)."""
    return tuple(current_trace_context().items())


class Backoff:
    """Jittered exponential backoff: 0.2 s, 0.4 s, ... up to `ceiling_s`."""

    def __init__(self, first_s: float = 0.2, ceiling_s: float = 5.0) -> None:
        self.first_s = first_s
        self.ceiling_s = ceiling_s
        self.attempt = 0

    def next_delay(self) -> float:
        """The next wait, growing with each failed attempt."""
        delay = min(self.ceiling_s, self.first_s * 2.0**self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        """A success: start from the shortest wait again."""
        self.attempt = 0

"""Which failures a client tries again, and how long it waits between tries.

Clients retry only UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED, with jittered
exponential backoff; everything else is a bug in the request and is reported, not retried. The
servers mark their own errors retryable from the same set (services/runtime/errors.py).
"""

from __future__ import annotations

import random

import grpc

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def is_retryable(error: BaseException) -> bool:
    """Whether a failed call is worth trying again (the server is down, busy or slow)."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in RETRYABLE_CODES
    return isinstance(error, TimeoutError | ConnectionError)


def describe(error: BaseException) -> str:
    """One line a person can act on, for logs and ErrorFrames."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, TimeoutError):
        return "no answer within the deadline (server stalled or overloaded)"
    return f"{type(error).__name__}: {error}"


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

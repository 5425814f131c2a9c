"""The per-server limit on concurrent streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.runtime.errors import AtCapacity


class StreamLimiter:
    """Admits at most `capacity` concurrent streams; the next one gets RESOURCE_EXHAUSTED.

    Refusing beats queueing: a voice stream that waits for a slot is already too late, and a
    client (or load balancer) can retry elsewhere.
    """

    def __init__(self, capacity: int, what: str = "streams") -> None:
        self.capacity = capacity
        self.active = 0
        self._what = what

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of a stream."""
        if self.active >= self.capacity:
            raise AtCapacity(
                f"server is at its limit of {self.capacity} concurrent {self._what}; "
                "retry with backoff, or start it with a higher --max-streams"
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

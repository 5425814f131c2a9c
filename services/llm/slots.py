"""A fair pool of sequence slots with cache affinity.

A slot is one model context (its KV cache) that serves one request at a time, for the whole
request, so that no two requests ever touch the same context. A free slot is chosen by a score,
the length of the prompt prefix it already holds in cache, so that a conversation's next turn
lands where its earlier turns are cached. When every slot is busy, requests wait in arrival order
(first come, first served) and each released slot goes to the oldest waiter.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class SlotPool(Generic[T]):
    """Hands out slots one request at a time; see the module docstring."""

    def __init__(self, slots: Sequence[T]) -> None:
        if not slots:
            raise ValueError("a slot pool needs at least one slot")
        self.slots = tuple(slots)
        # Least recently released first, so that ties go to the coldest slot.
        self._free: list[T] = list(slots)
        self._waiters: deque[asyncio.Future[T]] = deque()

    @property
    def free(self) -> int:
        """Slots not held by a request."""
        return len(self._free)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    @asynccontextmanager
    async def acquire(self, score: Callable[[T], int]) -> AsyncIterator[T]:
        """Hold a slot: the free one with the highest `score`, else the next one released."""
        slot = await self._take(score)
        try:
            yield slot
        finally:
            self._release(slot)

    async def _take(self, score: Callable[[T], int]) -> T:
        if self._free and not self.waiting:
            best = max(range(len(self._free)), key=lambda i: score(self._free[i]))
            return self._free.pop(best)
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())  # handed over just as the waiter was cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _release(self, slot: T) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

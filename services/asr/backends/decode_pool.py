"""One decode at a time on a dedicated thread, shared by every stream, finals before interims.

CTranslate2 already spreads one decode over all its threads, so running two decodes at once on a
small CPU only makes both slower. The pool therefore runs one job at a time and picks the next
by priority: a final transcript (someone is waiting for it) before any interim one (a nicety). An
interim job reads its audio only when its turn comes, so a job that waited in line decodes the
freshest audio rather than what was there when it queued.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class Priority(IntEnum):
    """Lower runs first."""

    FINAL = 0
    INTERIM = 1


class DecodePool(Generic[T]):
    """Runs blocking decode jobs one at a time off the event loop, by priority.

    A job cancelled while it waits leaves the line; a job cancelled while it runs finishes on its
    thread (a CTranslate2 call cannot be interrupted) and only then lets the next one start, so
    two decodes never overlap.
    """

    def __init__(self, thread_name: str = "decode") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._busy = False

    @property
    def queued(self) -> int:
        """Jobs waiting for their turn (not counting the one running)."""
        return sum(1 for *_, turn in self._waiting if not turn.done())

    async def run(self, priority: Priority, job: Callable[[], Callable[[], T]]) -> T:
        """Wait for a turn, then call `job()` on the loop and its result on the decode thread.

        `job` runs on the event loop when the turn comes (to take a snapshot of the audio) and
        returns the blocking work to run on the decode thread.
        """
        await self._acquire(priority)
        try:
            work = job()
        except BaseException:
            self._release()
            raise
        running = asyncio.get_running_loop().run_in_executor(self._executor, work)
        running.add_done_callback(self._finished)
        # Shielded: cancelling the caller must not release the turn while the thread still runs.
        return await asyncio.shield(running)

    def close(self) -> None:
        """Stop the thread once the running job is done; queued jobs are not started."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _acquire(self, priority: Priority) -> None:
        if not self._busy and not self._waiting:
            self._busy = True
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (int(priority), next(self._order), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # the turn was handed over just as we were cancelled
            raise

    def _release(self) -> None:
        while self._waiting:
            *_, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)  # the turn passes on; the pool stays busy
                return
        self._busy = False

    def _finished(self, running: asyncio.Future[T]) -> None:
        if not running.cancelled():
            running.exception()  # retrieved: a caller that went away cannot see it
        self._release()

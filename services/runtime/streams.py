"""Bounded queues and the duplex scaffolding that every bidirectional servicer uses.

A servicer method is the writer loop: it yields what `Duplex.responses()` gives. Beside it run
worker tasks (a request reader, a model worker) that put responses into the duplex. When any task
fails, the writer raises that error; when the writer ends (normally, by error, or because the client
went away), every task is cancelled and awaited. No task outlives its call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class QueueClosed(Exception):
    """Raised by `StreamQueue.put` after the queue was closed."""


class StreamQueue(Generic[T]):
    """A bounded FIFO that can be closed (end of stream) or failed (error for the reader).

    Unlike `asyncio.Queue`, queued items can be discarded selectively, which is how a TTS cancel
    drops audio of a cancelled stream that was produced but not yet sent. All methods run on the
    event loop's thread, so state changes and the events that announce them stay in step.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """True once `close` or `fail` was called."""
        return self._closed

    async def put(self, item: T) -> None:
        """Append `item`, waiting while the queue is full (backpressure)."""
        while not self._closed and len(self._items) >= self.maxsize:
            await self._writable.wait()
        if self._closed:
            raise QueueClosed
        self._items.append(item)
        self._update()

    async def get(self) -> T:
        """Take the oldest item; raises StopAsyncIteration at the end, or the failure."""
        while not self._items and not self._closed:
            await self._readable.wait()
        if self._items:
            item = self._items.popleft()
            self._update()
            return item
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def get_nowait_all(self) -> list[T]:
        """Take every queued item without waiting (for consumers that batch their input)."""
        items = list(self._items)
        self._items.clear()
        self._update()
        return items

    def discard(self, predicate: Callable[[T], bool]) -> int:
        """Drop queued items matching `predicate`; returns how many were dropped."""
        kept = [item for item in self._items if not predicate(item)]
        dropped = len(self._items) - len(kept)
        self._items = deque(kept)
        self._update()
        return dropped

    def close(self) -> None:
        """End of stream: `get` drains what is queued, then stops."""
        self._closed = True
        self._update()

    def fail(self, error: BaseException) -> None:
        """Like `close`, but `get` raises `error` once the queue is drained."""
        if not self._closed:
            self._error = error
        self.close()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()

    def _update(self) -> None:
        if self._items or self._closed:
            self._readable.set()
        else:
            self._readable.clear()
        if self._closed or len(self._items) < self.maxsize:
            self._writable.set()
        else:
            self._writable.clear()


R = TypeVar("R")


class Duplex(Generic[R]):
    """The response side of one bidirectional call, fed by worker tasks.

    Use as `async with Duplex(maxsize) as duplex:`; `spawn` workers; `async for` over
    `duplex.responses()` and yield each. `finish()` ends the responses after what is queued.
    """

    def __init__(self, maxsize: int) -> None:
        self.outbox: StreamQueue[R] = StreamQueue(maxsize)
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Duplex[R]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run `work` beside the writer; its failure ends the call with that error."""
        task = asyncio.create_task(self._guard(work), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def send(self, response: R) -> None:
        """Queue a response for the client (waits while the client is slow to read)."""
        await self.outbox.put(response)

    def finish(self) -> None:
        """No more responses after those queued."""
        self.outbox.close()

    def responses(self) -> AsyncIterator[R]:
        """What the servicer yields to the client."""
        return aiter(self.outbox)

    async def aclose(self) -> None:
        """Cancel and await every worker (idempotent)."""
        self.outbox.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except QueueClosed:
            pass  # the call is ending; nothing left to deliver
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.outbox.fail(err)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has stopped, without absorbing our own cancellation."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait({task})

"""The batcher of the Parakeet backend: the ready chunks of many streams in one forward pass.

Each stream submits one step at a time (a chunk and the state it advances) and waits until it is
done. One task gathers what is queued, groups the steps that can share a forward pass (same
first/last flags and length, so that their chunks and caches stack), and runs each group on the
model's thread. Nothing of NeMo is here: `forward` is the backend's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.asr.backends.parakeet_stream import Chunk
from services.runtime.errors import Unavailable

S = TypeVar("S")

#: Steps queued per `max_batch`. Each stream has at most one step queued (it waits for that step
#: before it cuts the next chunk), so the bound is reached only with more open streams than four
#: full batches; then a stream waits for room, which holds back its audio (the servicer's bounded
#: event queue passes that on to the client), and nothing is dropped.
QUEUED_BATCHES = 4


@dataclass
class Step(Generic[S]):
    """One chunk of one stream, waiting for its forward pass."""

    state: S  # the stream's model state, which the forward pass advances in place
    chunk: Chunk
    done: asyncio.Future[None]


class StepBatcher(Generic[S]):
    """Runs the steps of every stream in shared forward passes, on one model thread.

    Args:
        forward: Blocking: one forward pass over a group of steps; updates their states.
        executor: The model's thread.
        max_batch: The most steps in one forward pass.
    """

    def __init__(
        self, forward: Callable[[list[Step[S]]], None], executor: Executor, max_batch: int
    ) -> None:
        self.forward = forward
        self.executor = executor
        self.max_batch = max_batch
        self._steps: asyncio.Queue[Step[S]] = asyncio.Queue(max_batch * QUEUED_BATCHES)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the batching task (on the running loop)."""
        self._task = asyncio.create_task(self._run(), name="nemo-batcher")

    async def aclose(self) -> None:
        """Stop batching; steps still queued fail as UNAVAILABLE rather than wait forever."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        while not self._steps.empty():
            _fail(self._steps.get_nowait().done)

    async def step(self, state: S, chunk: Chunk) -> None:
        """Run one chunk of one stream (batched with other streams' chunks)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._steps.put(Step(state, chunk, done))  # waits while the queue is full
        if self._task is None or self._task.done():  # stopped while this step waited for room
            _fail(done)
        await done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            steps = [await self._steps.get()]
            while len(steps) < self.max_batch and not self._steps.empty():
                steps.append(self._steps.get_nowait())
            try:
                for group in _groups(s for s in steps if not s.done.cancelled()):
                    try:
                        await loop.run_in_executor(self.executor, self.forward, group)
                    except Exception as err:  # a failed batch fails its streams, not the batcher
                        for s in group:
                            if not s.done.done():
                                s.done.set_exception(err)
                        continue
                    for s in group:
                        if not s.done.done():
                            s.done.set_result(None)
            finally:  # cancelled (the backend is closing): fail the steps taken but not run
                for s in steps:
                    _fail(s.done)


def _groups(steps: Iterable[Step[S]]) -> list[list[Step[S]]]:
    """Steps that can share a forward pass: the same first/last flags and chunk length."""
    groups: dict[tuple[bool, bool, int], list[Step[S]]] = {}
    for s in steps:
        groups.setdefault((s.chunk.first, s.chunk.last, s.chunk.length), []).append(s)
    return list(groups.values())


def _fail(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(Unavailable("the speech model is shutting down"))

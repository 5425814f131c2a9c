"""A real Pipecat pipeline around one adapter, recording what comes out of it on either side.

The tests of the three adapters (tests/test_bots_adapters.py) run each adapter between a recording
source (upstream frames) and a recording sink (downstream frames) in a real pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMContextFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from bots.frames import LLMChunkFrame
from tests.helpers import frames

RATE = 16000
DOWN = FrameDirection.DOWNSTREAM
UP = FrameDirection.UPSTREAM


class Recorder(FrameProcessor):
    """Passes every frame on and keeps those travelling in `direction`, with their arrival time."""

    def __init__(self, direction: FrameDirection) -> None:
        super().__init__()
        self.direction = direction
        self.seen: list[tuple[float, Frame]] = []
        self._changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction and not isinstance(frame, StartFrame):
            self.seen.append((time.perf_counter(), frame))
            self._changed.set()
        await self.push_frame(frame, direction)

    def all(self, kind: type[Frame]) -> list[Any]:
        return [frame for _, frame in self.seen if isinstance(frame, kind)]

    def at(self, kind: type[Frame]) -> float:
        """When the first frame of `kind` arrived."""
        return next(at for at, frame in self.seen if isinstance(frame, kind))

    async def wait_for(
        self,
        kind: type[Frame],
        timeout_s: float,
        count: int = 1,
        where: Callable[[Any], bool] = lambda _: True,
    ) -> Any:
        """The `count`th frame of `kind` (matching `where`), waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [frame for frame in self.all(kind) if where(frame)]
            if len(found) >= count:
                return found[count - 1]
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = ", ".join(type(frame).__name__ for _, frame in self.seen[-30:])
                raise AssertionError(
                    f"{len(found)} of {count} {kind.__name__} in {timeout_s:g} s; saw: {seen}"
                )
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass


class Bench:
    """One adapter between a recording source (upstream frames) and sink (downstream frames)."""

    def __init__(self, worker: PipelineWorker, source: Recorder, sink: Recorder) -> None:
        self.worker = worker
        self.up = source
        self.down = sink

    async def send(self, *frames_: Frame, direction: FrameDirection = DOWN) -> None:
        for frame in frames_:
            await self.worker.queue_frame(frame, direction)

    async def say(self, pcm: bytes) -> None:
        """Stream `pcm` in 20 ms frames, ten times faster than real time."""
        for chunk in frames(pcm, RATE):
            await self.send(InputAudioRawFrame(audio=chunk, sample_rate=RATE, num_channels=1))
            await asyncio.sleep(0.002)

    def errors(self) -> list[str]:
        return [frame.error for frame in self.up.all(ErrorFrame)]


@asynccontextmanager
async def bench(adapter: FrameProcessor) -> AsyncIterator[Bench]:
    """Run `adapter` in a real pipeline until the block ends."""
    source, sink = Recorder(UP), Recorder(DOWN)
    worker = PipelineWorker(
        Pipeline([source, adapter, sink]),
        params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
        cancel_on_idle_timeout=False,
        enable_rtvi=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker: PipelineWorker, _frame: Frame) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(started.wait(), 5)
        yield Bench(worker, source, sink)
    finally:
        await worker.cancel()
        await asyncio.wait_for(task, 10)


async def until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Wait for a condition on state the test does not get frames for (a double's counters)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@contextmanager
def captured_logs(level: str = "WARNING") -> Iterator[list[str]]:
    """The adapters' loguru messages at `level` and above, while the block runs."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level=level, format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def is_silence(frame: TTSAudioRawFrame) -> bool:
    return not any(frame.audio)


def llm_context(text: str = "Hello?") -> LLMContextFrame:
    return LLMContextFrame(context=LLMContext(messages=[{"role": "user", "content": text}]))


def chunk(request_id: str, index: int, text: str, ends_sentence: bool = True) -> LLMChunkFrame:
    return LLMChunkFrame(
        text=text, request_id=request_id, chunk_index=index, ends_sentence=ends_sentence
    )


def after(recorder: Recorder, kind: type[Frame]) -> list[Frame]:
    """The frames `recorder` saw after the first one of `kind`."""
    start = recorder.at(kind)
    return [frame for at, frame in recorder.seen if at > start]

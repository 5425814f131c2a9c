"""A pausable playout: the bot's audio stops at once when the user may be barging in.

With `TurnSettings.resume_after_false_interruption` (and the barge-in rules on), `PlayoutGate`
sits between the TTS adapter and the output transport. It lets the reply's frames through in
order, audio at the pace it plays with `LEAD_S` ahead, so that the transport never holds more
than that. `BargeInGate` pauses it when a user turn starts while the bot speaks: the audio stops
within the lead (plus the transport's own chunk) instead of when the words confirm the turn. If
the turn is confirmed, the interruption clears what the gate holds; if it is judged false
(noise, a backchannel, the bot's echo) or stays unconfirmed for `false_interruption_timeout_s`,
the reply resumes from where it paused. Nothing held was played, so the words held are not in
the context unless they are played after the resume (`bots.heard`).

What the gate holds is bounded by the TTS adapter's flow control (the LLM releases a chunk only
when the TTS has completed the one before), not by a count here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    SystemFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

#: Audio let through ahead of the clock: the transport's buffer, and what plays after a pause.
LEAD_S = 0.1


class PlayoutGate(FrameProcessor):
    """Releases the reply's frames at the pace of its audio; can pause and resume."""

    def __init__(self, lead_s: float = LEAD_S, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lead_s = lead_s
        self._queue: deque[Frame] = deque()
        self._ready = asyncio.Event()
        self._paused = False
        self._paused_at = 0.0
        self._played_until = 0.0  # perf_counter time at which the audio let through ends
        self._task: asyncio.Task[None] | None = None
        #: Every pause as (seconds paused, resumed), for tests and logs.
        self.pauses: list[tuple[float, bool]] = []

    @property
    def paused(self) -> bool:
        """Whether the playout is paused now."""
        return self._paused

    def pause(self) -> None:
        """Stop letting audio through (what the transport holds still plays out)."""
        if not self._paused:
            self._paused = True
            self._paused_at = time.perf_counter()
            self._ready.clear()

    def resume(self) -> None:
        """Go on from where the pause stopped."""
        if self._paused:
            self._paused = False
            self.pauses.append((time.perf_counter() - self._paused_at, bool(self._queue)))
            logger.debug(f"{self}: resumed after {self.pauses[-1][0]:.2f} s")
            self._wake()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Queue the reply's frames (and the end, after them); system and upstream ones pass."""
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._task = self.create_task(self._release(), "playout")
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            self._queue.clear()  # never played: the context will not hold it
            if self._paused:
                self._paused = False
                self.pauses.append((time.perf_counter() - self._paused_at, False))
            await self.push_frame(frame, direction)
        elif isinstance(frame, SystemFrame) or direction == FrameDirection.UPSTREAM:
            await self.push_frame(frame, direction)
        else:
            self._queue.append(frame)
            self._wake()

    def _wake(self) -> None:
        if self._queue and not self._paused:
            self._ready.set()

    async def _release(self) -> None:
        while True:
            await self._ready.wait()
            while self._queue and not self._paused:
                frame = self._queue[0]
                if isinstance(frame, OutputAudioRawFrame):
                    now = time.perf_counter()
                    ahead = self._played_until - now
                    if ahead > self.lead_s:
                        await asyncio.sleep(ahead - self.lead_s)
                        continue  # paused or interrupted meanwhile?
                    seconds = len(frame.audio) / 2 / frame.num_channels / frame.sample_rate
                    self._played_until = max(self._played_until, now) + seconds
                if self._queue and self._queue[0] is frame:
                    self._queue.popleft()
                    await self.push_frame(frame)
            self._ready.clear()
            self._wake()

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await self.cancel_task(task)

    async def cleanup(self) -> None:
        """Stop the release task with the pipeline."""
        await super().cleanup()  # type: ignore[no-untyped-call]
        await self._stop()

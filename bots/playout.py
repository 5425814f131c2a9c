"""A pausable playout: the bot's audio stops at once when the user may be barging in.

With `TurnSettings.resume_after_false_interruption` (and the barge-in rules on), `PlayoutGate`
sits between the TTS adapter and the output transport. It lets the reply's frames through in
order, audio only while the transport holds less than `LEAD_S` of it that it has not played:
`PlayoutAck`, after the output transport, reports each chunk the transport has written. A
long TTS frame is cut into `PIECE_S` pieces first, so that what the transport holds is never
more than the lead and one piece. `BargeInGate` pauses the gate when a user turn starts while
the bot speaks: the audio stops within that much (about 90 ms) instead of when the words
confirm the turn. If the turn is confirmed, the interruption clears what the gate holds; if it
is judged false (noise, a backchannel, the bot's echo) or stays unconfirmed for
`false_interruption_timeout_s`, the reply resumes from where it paused. Nothing held was
played, so the words held are not in the context unless they are played after the resume
(`bots.heard`).

Pacing by the transport's own reports, not by the clock alone: a transport that plays late (a
busy host, a network transport's buffer) would otherwise fill up ahead of the clock, and a pause
would stop nothing of what it holds. A transport that reports nothing (no `PlayoutAck`, or one
that pushes no audio on) is paced by the clock, as before.

What the gate holds is bounded by the TTS adapter's flow control (the LLM releases a chunk only
when the TTS has completed the one before), not by a count here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
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

#: Audio let through that the transport has not played yet: what plays on after a pause.
LEAD_S = 0.05
#: Longer audio frames are cut into pieces of this length before they go to the transport.
PIECE_S = 0.02
#: Without a report from the transport for this long, the gate paces audio by the clock.
ACK_STALE_S = 0.5


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
        self._released_s = 0.0  # audio let through since the last interruption
        self._acked_s = 0.0  # of which the transport has reported playing this much
        self._acked_at = -math.inf  # when it last reported
        self._acked = asyncio.Event()
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

    def played(self, seconds: float) -> None:
        """The transport has played (written) `seconds` more of the audio let through."""
        self._acked_s += seconds
        self._acked_at = time.perf_counter()
        self._acked.set()

    @property
    def backlog_s(self) -> float:
        """Audio let through that the transport has not reported playing."""
        return max(0.0, self._released_s - self._acked_s)

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
            self._released_s = self._acked_s = 0.0  # the transport drops what it holds
            if self._paused:
                self._paused = False
                self.pauses.append((time.perf_counter() - self._paused_at, False))
            await self.push_frame(frame, direction)
        elif isinstance(frame, SystemFrame) or direction == FrameDirection.UPSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, OutputAudioRawFrame):
            self._queue.extend(pieces(frame, PIECE_S))
            self._wake()
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
                    wait_s = self._wait_s()
                    if wait_s > 0:
                        self._acked.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._acked.wait(), wait_s)
                        continue  # paused or interrupted meanwhile?
                    seconds = duration_s(frame)
                    self._played_until = max(self._played_until, time.perf_counter()) + seconds
                    self._released_s += seconds
                if self._queue and self._queue[0] is frame:
                    self._queue.popleft()
                    await self.push_frame(frame)
            self._ready.clear()
            self._wake()

    def _wait_s(self) -> float:
        """How long to wait before the next audio may go (0: now)."""
        now = time.perf_counter()
        if now - self._acked_at < ACK_STALE_S:  # the transport reports what it plays
            return 0.0 if self.backlog_s <= self.lead_s else PIECE_S
        return max(0.0, self._played_until - now - self.lead_s)

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await self.cancel_task(task)

    async def cleanup(self) -> None:
        """Stop the release task with the pipeline."""
        await super().cleanup()  # type: ignore[no-untyped-call]
        await self._stop()


def duration_s(frame: OutputAudioRawFrame) -> float:
    """Seconds of audio in `frame`."""
    return len(frame.audio) / 2 / frame.num_channels / frame.sample_rate


def pieces(frame: OutputAudioRawFrame, piece_s: float) -> list[OutputAudioRawFrame]:
    """`frame` cut into frames of the same kind of at most `piece_s` seconds (itself if short)."""
    step = 2 * frame.num_channels * max(1, round(piece_s * frame.sample_rate))
    if len(frame.audio) <= step:
        return [frame]
    return [
        dataclasses.replace(frame, audio=frame.audio[at : at + step])
        for at in range(0, len(frame.audio), step)
    ]


class PlayoutAck(FrameProcessor):
    """After the output transport: reports each audio chunk it has written to the gate."""

    def __init__(self, gate: PlayoutGate, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.gate = gate

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Note played audio; pass everything on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            self.gate.played(duration_s(frame))
        await self.push_frame(frame, direction)

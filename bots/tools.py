"""The bot's own tools: the local date and time, and timers that speak when they fire.

`BotTools` holds the tools' schemas (for the context) and their handlers (registered on the LLM
service with `register`), and owns the timers. A timer is an asyncio task; when it fires it queues
a `TTSSpeakFrame` into the pipeline of the call that set it, so the announcement is spoken after
whatever the bot is saying. `close` cancels the timers still running: the bot calls it when its
pipeline ends, so that no timer outlives it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import LLMAssistantPushAggregationFrame, TTSSpeakFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.services.llm_service import FunctionCallParams, LLMService

MAX_TIMER_S = 24 * 3600

GET_CURRENT_TIME = FunctionSchema(
    name="get_current_time",
    description="The local date, time and time zone where the user is. Call it whenever the "
    "user asks what time or day it is.",
    properties={},
    required=[],
)
SET_TIMER = FunctionSchema(
    name="set_timer",
    description="Start a countdown timer; the assistant says so aloud when it is done.",
    properties={
        "seconds": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_TIMER_S,
            "description": "How long the timer runs, in seconds (five minutes: 300).",
        },
        "label": {
            "type": "string",
            "maxLength": 40,
            "description": "What the timer is for, in a word or two (e.g. tea), if the user said.",
        },
    },
    required=["seconds"],
)
CANCEL_TIMER = FunctionSchema(
    name="cancel_timer",
    description="Stop running timers: the one with the given label, or all of them.",
    properties={
        "label": {"type": "string", "description": "The label of the timer to stop."},
    },
    required=[],
)


def local_now() -> datetime:
    """The current time in the machine's time zone (timezone-aware)."""
    return datetime.now().astimezone()


def spoken_time(moment: datetime) -> str:
    """The time of day as said aloud, e.g. "3:05 PM"."""
    hour = moment.hour % 12 or 12
    return f"{hour}:{moment.minute:02d} {'AM' if moment.hour < 12 else 'PM'}"


def spoken_duration(seconds: float) -> str:
    """A duration as said aloud, e.g. "1 hour 5 minutes" (3900) or "1 minute 30 seconds" (90)."""
    whole = max(1, round(seconds))
    counts = (whole // 3600, whole // 60 % 60, whole % 60)
    parts = zip(counts, ("hour", "minute", "second"), strict=True)
    return " ".join(f"{count} {unit}{'s' if count > 1 else ''}" for count, unit in parts if count)


def time_of(moment: datetime) -> dict[str, str]:
    """The date and time for the model: spoken forms, and ISO 8601 with the UTC offset."""
    return {
        "time": spoken_time(moment),
        "date": f"{moment:%A}, {moment:%B} {moment.day}, {moment.year}",
        "time_zone": f"{moment.tzname() or ''} (UTC{moment:%z})".strip(),
        "iso": moment.isoformat(timespec="seconds"),
    }


@dataclass
class Timer:
    """A running timer."""

    id: int
    seconds: float
    label: str
    fires_at: datetime
    task: asyncio.Task[None] | None = None

    @property
    def announcement(self) -> str:
        """What the bot says when it fires."""
        if self.label:
            return f"Your {self.label} timer is done."
        return f"Your timer for {spoken_duration(self.seconds)} is done."

    def describe(self) -> dict[str, Any]:
        """The timer for the model."""
        return {
            "label": self.label,
            "duration": spoken_duration(self.seconds),
            "fires_at": spoken_time(self.fires_at),
        }


class BotTools:
    """`get_current_time`, `set_timer` and `cancel_timer` for one bot, and its timers.

    Args:
        clock: The current local time (timezone-aware); tests pass a fixed one.
    """

    def __init__(self, clock: Callable[[], datetime] = local_now) -> None:
        self.clock = clock
        self.timers: dict[int, Timer] = {}
        self._ids = itertools.count(1)

    @property
    def schema(self) -> ToolsSchema:
        """The tools, for the context."""
        return ToolsSchema(standard_tools=[GET_CURRENT_TIME, SET_TIMER, CANCEL_TIMER])

    def register(self, llm: LLMService) -> None:
        """Register the handlers on `llm`."""
        llm.register_function(GET_CURRENT_TIME.name, self.get_current_time)
        llm.register_function(SET_TIMER.name, self.set_timer)
        llm.register_function(CANCEL_TIMER.name, self.cancel_timer)

    async def get_current_time(self, params: FunctionCallParams) -> None:
        """The local date and time."""
        await params.result_callback(time_of(self.clock()))

    async def set_timer(self, params: FunctionCallParams) -> None:
        """Start a timer that speaks in the caller's pipeline when it fires."""
        seconds = params.arguments.get("seconds")
        label = str(params.arguments.get("label") or "").strip()
        # The server checks calls against the schema; this guards handlers called otherwise.
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            await params.result_callback({"error": "seconds must be a number"})
            return
        if not 0 < seconds <= MAX_TIMER_S:
            await params.result_callback(
                {"error": f"seconds must be more than 0 and at most {MAX_TIMER_S}"}
            )
            return
        timer = self.start(seconds, label, params.pipeline_worker)
        await params.result_callback({"started": timer.describe()})

    async def cancel_timer(self, params: FunctionCallParams) -> None:
        """Stop the timers with the given label, or all of them."""
        label = str(params.arguments.get("label") or "").strip().lower()
        chosen = [t for t in self.timers.values() if not label or t.label.lower() == label]
        for timer in chosen:
            self._stop(timer)
        await params.result_callback(
            {
                "cancelled": [timer.describe() for timer in chosen],
                "still_running": [timer.describe() for timer in self.timers.values()],
            }
        )

    def start(self, seconds: float, label: str, worker: PipelineWorker) -> Timer:
        """Start a timer whose announcement is queued into `worker`'s pipeline."""
        timer = Timer(next(self._ids), seconds, label, self.clock() + timedelta(seconds=seconds))
        timer.task = asyncio.create_task(self._ring(timer, worker), name=f"timer-{timer.id}")
        self.timers[timer.id] = timer
        return timer

    async def close(self) -> None:
        """Cancel every running timer and wait until they have stopped."""
        tasks = [timer.task for timer in self.timers.values() if timer.task is not None]
        for timer in list(self.timers.values()):
            self._stop(timer)
        if tasks:
            await asyncio.wait(tasks)

    def _stop(self, timer: Timer) -> None:
        self.timers.pop(timer.id, None)
        if timer.task is not None:
            timer.task.cancel()

    async def _ring(self, timer: Timer, worker: PipelineWorker) -> None:
        try:
            await asyncio.sleep(timer.seconds)
            logger.info(f"timer {timer.id} ({spoken_duration(timer.seconds)}) fired")
            # The push frame commits the spoken text to the context as its own assistant turn
            # (Pipecat's TTS services push one after a TTSSpeakFrame; GrpcTTSService does not).
            await worker.queue_frames(
                [TTSSpeakFrame(timer.announcement), LLMAssistantPushAggregationFrame()]
            )
        finally:
            self.timers.pop(timer.id, None)

"""What the user heard: the words of the bot's reply whose audio the transport played.

`GrpcTTSService` sends each word of a reply as its own `TTSTextFrame`, placed in the audio where
the word starts. The output transport holds such frames in its audio queue and releases them
when the audio before them has been written out; an interruption drops the ones not yet
released. So the frames that leave the transport are the words whose start was played (the rule:
a word counts as heard once its first audio was written, give or take one output chunk of 40 ms),
and the assistant aggregator after the transport builds the context from exactly those.

`HeardWords` sits between the transport and the assistant aggregator. It lets every frame
through and, when an interruption cuts a reply, says so: a log line with the counts (the text
too only with NEMOTRON_TRACE_CONTENT) and a `reply.cut` event on the turn's span. It also keeps
the words played in the last seconds, for the barge-in gate to recognise the bot's own voice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from loguru import logger
from opentelemetry import trace
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TTSStartedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from bots.tracing import content_on
from services.runtime.trace_types import ATTR_WORDS_GENERATED, ATTR_WORDS_PLAYED, EVENT_REPLY_CUT

#: How long a played word stays "recent" (what an echo of it may still be heard as).
RECENT_S = 4.0
#: Most recent words kept (the bound of the buffer, whatever the time says).
MAX_RECENT_WORDS = 64


PUNCTUATION = ".,!?;:\"'()[]\u2026-\u2013\u2014"


def normalise(text: str) -> list[str]:
    """Lower-case words without the punctuation around them ("Yeah," -> "yeah")."""
    words = (w.strip(PUNCTUATION).lower() for w in text.split())
    return [w for w in words if w]


class HeardWords(FrameProcessor):
    """Counts the reply's played words and reports the cut when an interruption comes.

    Args:
        generated_words: How many words of the current reply were generated (the TTS knows).
        **kwargs: Passed to `FrameProcessor`.
    """

    def __init__(self, generated_words: Callable[[], int], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._generated_words = generated_words
        self._reply_open = False
        self._after_cut = False  # an interruption passed; no new speech started since
        self._played: list[str] = []
        self._recent: deque[tuple[float, str]] = deque(maxlen=MAX_RECENT_WORDS)
        #: Every cut so far as (words played, words generated), oldest first (tests, benchmark).
        self.cuts: list[tuple[int, int]] = []

    def recent_words(self, within_s: float = RECENT_S) -> set[str]:
        """The words (normalised) the transport played in the last `within_s` seconds."""
        since = time.monotonic() - within_s
        return {word for at, word in self._recent if at >= since}

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Track the reply; pass every frame on."""
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, (LLMFullResponseStartFrame, TTSStartedFrame)):
                self._after_cut = False
                if isinstance(frame, LLMFullResponseStartFrame):
                    self._reply_open = True
                    self._played = []
            elif isinstance(frame, LLMFullResponseEndFrame):
                self._reply_open = False
            elif isinstance(frame, TTSTextFrame) and frame.append_to_context:
                if self._after_cut:
                    # Released by the transport as the interruption passed: not part of any
                    # reply the aggregator still has open, so not of the next one either.
                    logger.debug(f"{self}: dropped a word released after the interruption")
                    return
                self._played.append(frame.text)
                now = time.monotonic()
                self._recent.extend((now, word) for word in normalise(frame.text))
            elif isinstance(frame, InterruptionFrame):
                self._after_cut = True
                if self._reply_open:
                    self._reply_open = False
                    self._report_cut()
        await self.push_frame(frame, direction)

    def _report_cut(self) -> None:
        played = len("".join(self._played).split())
        generated = max(played, self._generated_words())
        self.cuts.append((played, generated))
        text = f": {''.join(self._played).strip()!r}" if content_on() else ""
        logger.info(f"{self}: reply cut at the last played word, {played} of {generated}{text}")
        tracing = getattr(self, "_tracing_context", None)
        context = tracing.get_turn_context() if tracing is not None else None
        if context is not None:
            trace.get_current_span(context).add_event(
                EVENT_REPLY_CUT, {ATTR_WORDS_PLAYED: played, ATTR_WORDS_GENERATED: generated}
            )

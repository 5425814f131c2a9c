"""What the user heard: the words of the bot's reply whose audio the transport played.

`GrpcTTSService` sends each word of a reply as its own `TTSTextFrame`, placed in the audio where
the word starts. The output transport holds such frames in its audio queue and releases them
when the audio before them has been written out; an interruption drops the ones not yet
released. So the frames that leave the transport are the words whose start was played. A start
is not a word, though: the bot's audio stops within about 90 ms of the user's first sound
(`bots.playout`), often inside a word. So `HeardWords` holds the latest word until it has been
heard, which is when `HEARD_AFTER_S` of audio after its start has been written, the next word
starts, or the segment ends; a word still held when the interruption comes was cut short and is
not in the context. The assistant aggregator after it builds the context from exactly the words
it lets through.

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
    ControlFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    OutputAudioRawFrame,
    SystemFrame,
    TTSStartedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from bots.playout import duration_s
from bots.tracing import content_on
from services.runtime.trace_types import ATTR_WORDS_GENERATED, ATTR_WORDS_PLAYED, EVENT_REPLY_CUT

#: A word is heard once this much of the audio from its start has been played (or the next word
#: started, or its segment ended): about the first syllable and a half of a spoken word.
HEARD_AFTER_S = 0.2
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
        self._held: list[Frame] = []  # the latest word and what followed it, until heard
        self._held_audio_s = 0.0  # audio played since its start
        self._recent: deque[tuple[float, str]] = deque(maxlen=MAX_RECENT_WORDS)
        #: Every cut so far as (words played, words generated), oldest first (tests, benchmark).
        self.cuts: list[tuple[int, int]] = []

    def recent_words(self, within_s: float = RECENT_S) -> set[str]:
        """The words (normalised) the transport played in the last `within_s` seconds."""
        since = time.monotonic() - within_s
        return {word for at, word in self._recent if at >= since}

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Track the reply; pass every frame on (the latest word once it has been heard)."""
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, InterruptionFrame):
                self._after_cut = True
                self._held = []  # cut short: not heard
                if self._reply_open:
                    self._reply_open = False
                    self._report_cut()
            elif isinstance(frame, TTSTextFrame) and frame.append_to_context:
                await self._release_held()
                if self._after_cut:
                    # Released by the transport as the interruption passed: not part of any
                    # reply the aggregator still has open, so not of the next one either.
                    logger.debug(f"{self}: dropped a word released after the interruption")
                    return
                self._held, self._held_audio_s = [frame], 0.0
                # Its echo may reach the microphone from its first sound on: recent at once.
                now = time.monotonic()
                self._recent.extend((now, w) for w in normalise(frame.text))
                return
            elif isinstance(frame, OutputAudioRawFrame):
                if self._held:
                    self._held_audio_s += duration_s(frame)
                    if self._held_audio_s >= HEARD_AFTER_S:
                        await self._release_held()
            elif isinstance(frame, ControlFrame):
                await self._release_held()  # the segment or reply ends: its last word was heard
            elif self._held and not isinstance(frame, SystemFrame):
                self._held.append(frame)  # what the TTS sent with the word goes with it
                return
            if isinstance(frame, (LLMFullResponseStartFrame, TTSStartedFrame)):
                self._after_cut = False
                if isinstance(frame, LLMFullResponseStartFrame):
                    self._reply_open = True
                    self._played = []
            elif isinstance(frame, LLMFullResponseEndFrame):
                self._reply_open = False
        await self.push_frame(frame, direction)

    async def _release_held(self) -> None:
        held, self._held = self._held, []
        if not held:
            return
        word = held[0]
        assert isinstance(word, TTSTextFrame)
        self._played.append(word.text)
        for frame in held:
            await self.push_frame(frame)

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

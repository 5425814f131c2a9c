"""Barge-in rules: which user speech stops the bot while it speaks.

With `TurnSettings.barge_in_min_words` or `barge_in_min_s` set, the VAD's start no longer
interrupts the bot by itself (`bots.turns`); `BargeInGate`, after the STT adapter, decides:

- The bot is not speaking (listening, or thinking before its first audio): the user's turn
  interrupts at once, as without the gate.
- The bot is speaking: the user's turn is held (its start, transcripts and end go no further)
  until its words confirm it. It is confirmed once the user has spoken `barge_in_min_s` seconds
  (by the VAD) and said `barge_in_min_words` words that are neither backchannels ("mm-hm",
  "yeah"...) nor the bot's own recent words heard back (its echo, with `echo_transcript_filter`),
  or at once on a command ("stop", "wait": `barge_in_commands`) that is not the bot's echo.
  Then the bot is interrupted and the held frames go on: the turn is answered as usual.
- A held turn that ends unconfirmed is dropped: the bot goes on, and neither the context nor the
  LLM sees it. If the bot finished its reply meanwhile, a turn with words of its own (not only
  backchannels or echo) is let through as an ordinary turn.

The speech's length is the VAD's, less its stop time (the silence the VAD waits for before it
says the user stopped): a hum of 0.5 s is 0.5 s, not 0.7, and while the VAD still hears speech
only what is certain counts, so that the length confirms no turn the VAD is about to end.

Only words said since the user started count. The ASR's utterance runs on from the user's last
turn, through the bot's reply, so its transcript also holds whatever of the bot's voice the
microphone heard before (echo, even after echo cancellation); with word times from the ASR
(`GrpcSTTService(word_timestamps=True)`, `audio_ms`) the gate keeps the words that end after the
user's speech began (the VAD start less `vad_start_s` and `ONSET_MARGIN_S`), for the count and in
the transcripts of the turn that go on to the context. Without word times it counts them all.

Loudspeakers: where the bot cancels its own echo, the canceller's residual passes the VAD's quick
start now and then and the ASR makes words of it. With `floor` (`bots.echo_floor`) a held turn is
confirmed only once the user's speech has also passed the echo floor (Pipecat's VAD thresholds)
since its onset: the bot pauses as quickly as on a headset, and resumes after its own residual.
There the speech's length is also the floor's (`floor_s`): the residual keeps the VAD open
around a short backchannel, which made a 0.27 s "yeah" last 0.6 s.

Latency: confirming by words needs the ASR's interim results, so with words required the bot
stops a few hundred milliseconds later than on the VAD start alone (the interim cadence of the
ASR server). `resume_after_false_interruption` (`bots.playout`) trades this the other way: the
bot's audio pauses at once on the VAD start and resumes if the turn is not confirmed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from difflib import SequenceMatcher

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from bots.heard import normalise
from bots.playout import PlayoutGate
from bots.tracing import content_on
from bots.turn_settings import TurnSettings

#: How long a held turn's end waits for its final transcript: the STT pushes the final before
#: the end, but Pipecat hands system frames (the end) ahead of data frames, and a slow ASR's
#: final comes after the STT has given up holding the end (its finalize timeout).
SETTLE_S = 2.0
#: Frames held for one turn at most; older interim transcripts give way beyond it.
MAX_HELD = 256
#: How long before the VAD's start (less its `vad_start_s`) the user's speech may have begun: the
#: VAD's own lag behind the speech onset, with room for a soft first sound.
ONSET_MARGIN_S = 0.3
#: How often a held turn that has its words looks again whether its speech passed the echo floor.
FLOOR_POLL_S = 0.04
#: How alike (difflib's ratio) a user word and a word the bot just played must be for the user
#: word to count as the bot's echo.
ECHO_SIMILARITY = 0.8


#: A hum of any length counts as a backchannel too, however the ASR spells it ("mmm", "hmm-hmm",
#: "m-m-m", "uhh", "umm", "ahh"): Whisper writes what it hears of one in many ways.
HUM = re.compile(r"^(?:[mh]+|u+[hm]+|a+h+)(?:-(?:[mh]+|u+[hm]+))*$")


def own_words(
    text: str, backchannels: tuple[str, ...], echo: set[str] | None = None
) -> tuple[list[str], int, int]:
    """The words of `text` that count for a barge-in, and how many were backchannels, echo.

    Backchannel phrases are removed wherever they occur (longest first, so "i see" goes before
    any single word); what is left is echo if the bot played it in the last seconds (`echo`).
    """
    words = normalise(text)
    phrases = sorted((normalise(p) for p in backchannels), key=len, reverse=True)
    kept: list[str] = []
    backchannel = 0
    i = 0
    while i < len(words):
        match = next((p for p in phrases if p and words[i : i + len(p)] == p), None)
        if match is None and HUM.match(words[i]):
            match = [words[i]]
        if match is not None:
            backchannel += len(match)
            i += len(match)
        else:
            kept.append(words[i])
            i += 1
    if echo:
        mine = [w for w in kept if not _is_echo(w, echo)]
        return mine, backchannel, len(kept) - len(mine)
    return kept, backchannel, 0


def said_any(text: str, phrases: tuple[str, ...], echo: set[str] | None = None) -> bool:
    """Whether `text` holds one of `phrases` whose words are not all `echo` (the bot's own)."""
    words = normalise(text)
    for phrase in (normalise(p) for p in phrases):
        for i in range(len(words) - len(phrase) + 1):
            if phrase and words[i : i + len(phrase)] == phrase:
                if not echo or not all(_is_echo(w, echo) for w in phrase):
                    return True
    return False


def _is_echo(word: str, echo: set[str]) -> bool:
    """Whether `word` is one of `echo` as an ASR may hear it back.

    The same word, one cut short by an interim result ("capi" for "capital"), or one misheard by
    a letter or two ("parish" for "paris").
    """
    if word in echo:
        return True
    for played in echo:
        if len(word) >= 3 and played.startswith(word):
            return True
        if SequenceMatcher(None, word, played).ratio() >= ECHO_SIMILARITY:
            return True
    return False


class BargeInGate(FrameProcessor):
    """Holds a user turn that starts while the bot speaks until its words confirm it.

    Args:
        turn: The bot's turn settings (the barge-in rules).
        recent_bot_words: The words the bot played in the last seconds (`HeardWords`), for the
            echo rule; None: no echo rule.
        playout: Paused while a turn is held (`resume_after_false_interruption`), resumed when
            the turn is dropped or stays unconfirmed for `false_interruption_timeout_s`; None:
            the bot goes on speaking until the turn is confirmed.
        audio_ms: Where the audio arriving now lies on the clock of the ASR's word times
            (`GrpcSTTService.audio_ms`); None: transcripts count whole.
        floor: Whether the user's speech has passed the echo floor since a moment
            (`FloorVADAnalyzer.passed_since`, time.monotonic); a held turn is confirmed only if it
            has since the turn's onset. None: no floor (headsets, browsers).
        floor_s: How long the speech has stood above the echo floor since a moment
            (`FloorVADAnalyzer.loud_s_since`); the held turn's length is at most that since its
            onset. None: the VAD's length alone.
        **kwargs: Passed to `FrameProcessor`.
    """

    def __init__(
        self,
        turn: TurnSettings,
        recent_bot_words: Callable[[], set[str]] | None = None,
        playout: PlayoutGate | None = None,
        audio_ms: Callable[[], int] | None = None,
        floor: Callable[[float], bool] | None = None,
        floor_s: Callable[[float], float] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._turn = turn
        self._audio_ms = audio_ms
        self._onset_ms: int | None = None  # the barge-in's start on the ASR's clock
        self._floor = floor
        self._floor_s = floor_s
        self._onset_at = 0.0  # and on time.monotonic
        self._recent_bot_words = recent_bot_words if turn.echo_transcript_filter else None
        self._playout = playout
        self._pause_timer: asyncio.Task[None] | None = None
        self._bot_speaking = False
        self._holding = False
        self._held: list[Frame] = []
        # The held turn's final transcripts so far and its latest interim one since, each as
        # (the user's words, those of them that count for the rule: sure enough).
        self._finals: list[tuple[str, str]] = []
        self._interim = ("", "")
        self._stopped = False
        self._discarding = False  # a dropped turn's late transcripts and end go nowhere
        self._final = asyncio.Event()
        self._vad_since: float | None = None
        self._speech_s = 0.0
        self._timer: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None
        #: Settled held turns as (confirmed, words, backchannel words, echo words), for tests.
        self.decisions: list[tuple[bool, int, int, int]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Pass frames on, holding a user turn that started while the bot speaks."""
        await super().process_frame(frame, direction)
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            # Not while the bot's audio is paused for a held turn: that is no end of the reply.
            self._bot_speaking = self._playout is not None and self._playout.paused
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._vad_since = time.monotonic() - self._turn.vad_start_s
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            if self._vad_since is not None:
                spoken = time.monotonic() - self._vad_since - self._turn.vad_stop_s
                self._speech_s += max(0.0, spoken)
            self._vad_since = None
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, UserStartedSpeakingFrame):
                await self._turn_started(frame)
                return
            if self._holding and await self._hold(frame):
                return
            if self._discarding and isinstance(
                frame, (InterimTranscriptionFrame, TranscriptionFrame, UserStoppedSpeakingFrame)
            ):
                return
            if isinstance(frame, (InterimTranscriptionFrame, TranscriptionFrame)):
                # A confirmed barge-in's later transcripts: the user's words only.
                self._keep_users_words(frame)
                if isinstance(frame, TranscriptionFrame):
                    self._onset_ms = None
        await self.push_frame(frame, direction)

    # ---- the held turn ------------------------------------------------------------------------

    async def _turn_started(self, frame: UserStartedSpeakingFrame) -> None:
        self._discarding = False
        if self._vad_since is None:
            self._vad_since = time.monotonic() - self._turn.vad_start_s
        if self._holding:
            # The turn detector ended the held turn and the user went on (the STT holds the end
            # until the final, the start is not held): one held turn, judged as a whole.
            self._held.append(frame)
            self._stopped = False
            self._final.clear()
            settler, self._settler = self._settler, None
            if settler is not None:
                await self.cancel_task(settler)
            return
        self._speech_s = 0.0
        if not self._bot_speaking:
            await self._interrupt()
            await self.push_frame(frame)
            return
        self._holding = True
        self._onset_at = self._vad_since - ONSET_MARGIN_S
        self._onset_ms = (
            self._audio_ms() - round(1000 * (self._turn.vad_start_s + ONSET_MARGIN_S))
            if self._audio_ms is not None
            else None
        )
        self._held = [frame]
        self._finals, self._interim = [], ("", "")
        self._stopped = False
        self._final.clear()
        if self._playout is not None:
            self._playout.pause()
            self._pause_timer = self.create_task(self._pause_timeout(), "barge-in-pause")

    async def _hold(self, frame: Frame) -> bool:
        """Hold `frame` if it belongs to the held turn (and judge the turn by it)."""
        if isinstance(frame, TranscriptionFrame):
            self._finals.append(self._keep_users_words(frame))
            self._interim = ("", "")
            self._final.set()
        elif isinstance(frame, InterimTranscriptionFrame):
            self._interim = self._keep_users_words(frame)
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._stopped = True
            if self._settler is None:
                self._settler = self.create_task(self._settle(), "barge-in-settle")
        else:
            return False  # not the user's: audio, VAD, the bot's frames go on
        if len(self._held) >= MAX_HELD:
            interim = next(
                (i for i, f in enumerate(self._held) if isinstance(f, InterimTranscriptionFrame)),
                None,
            )
            if interim is not None:
                del self._held[interim]
        self._held.append(frame)
        if not self._stopped:
            await self._judge()
        return True

    async def _judge(self) -> None:
        """Confirm the held turn now, later (when it has lasted long enough), or not yet."""
        if self._commanded():
            wait_s = 0.0
        else:
            words, _, _ = self._counts()
            if len(words) < self._turn.barge_in_min_words:
                return
            wait_s = self._turn.barge_in_min_s - self._spoken_s()
        if wait_s <= 0 and self._loud():
            await self._confirm()
        elif self._timer is None:
            self._timer = self.create_task(self._confirm_when_due(wait_s), "barge-in-timer")

    async def _confirm_when_due(self, wait_s: float) -> None:
        """Confirm once the turn has lasted long enough and passed the floor, if it goes on."""
        await asyncio.sleep(max(0.0, wait_s))
        while self._holding and not self._stopped:
            # The VAD may have paused and a later interim dropped words: both are looked at again.
            if self._due() and self._loud():
                await self._confirm()
                break
            await asyncio.sleep(FLOOR_POLL_S)
        self._timer = None

    def _due(self) -> bool:
        """Whether the held turn is a barge-in by its words and length (the floor aside)."""
        if self._commanded():
            return True
        words, _, _ = self._counts()
        return (
            len(words) >= self._turn.barge_in_min_words
            and self._spoken_s() >= self._turn.barge_in_min_s
        )

    def _loud(self) -> bool:
        """Whether the held turn's speech has passed the echo floor (always, without one)."""
        return self._floor is None or self._floor(self._onset_at)

    async def _settle(self) -> None:
        """The held turn ended: confirm or drop it once its final transcript is in."""
        try:
            await asyncio.wait_for(self._final.wait(), SETTLE_S)
        except TimeoutError:
            pass  # no final text (noise, or nothing recognised): judge by the interims
        self._settler = None
        if not self._holding:
            return
        words, backchannel, echo = self._counts()
        loud = self._loud()
        if loud and (self._due() or (not self._bot_speaking and words)):
            await self._confirm()
            return
        self._holding = False
        self._discarding = True
        self._onset_ms = None
        self._held = []
        await self._cancel_timer()
        self.decisions.append((False, len(words), backchannel, echo))
        logger.info(
            f"{self}: user speech did not stop the bot ({len(words)} words of their own, "
            f"{backchannel} backchannel, {echo} echo; {self._spoken_s():.2f} s"
            + ("" if loud else "; below the echo floor")
            + ")"
            + (f": {self._said()!r}" if content_on() else "")
        )
        await self._resume()

    async def _pause_timeout(self) -> None:
        await asyncio.sleep(self._turn.false_interruption_timeout_s)
        self._pause_timer = None
        if self._playout is not None and self._playout.paused:
            logger.info(f"{self}: no words confirmed the barge-in in time; the bot goes on")
            self._playout.resume()

    async def _resume(self) -> None:
        timer, self._pause_timer = self._pause_timer, None
        if timer is not None and timer is not asyncio.current_task():
            await self.cancel_task(timer)
        if self._playout is not None:
            self._playout.resume()

    async def _confirm(self) -> None:
        if not self._holding:
            return
        words, backchannel, echo = self._counts()
        self._holding = False
        await self._cancel_timer()
        self.decisions.append((True, len(words), backchannel, echo))
        text = f": {self._said()!r}" if content_on() else ""
        logger.info(
            f"{self}: barge-in confirmed ({len(words)} words"
            + (", a command" if self._commanded() else "")
            + f", {self._spoken_s():.2f} s of speech){text}"
        )
        held, self._held = self._held, []
        timer, self._pause_timer = self._pause_timer, None
        if timer is not None and timer is not asyncio.current_task():
            await self.cancel_task(timer)
        await self._interrupt()  # clears the paused playout too
        for frame in held:
            await self.push_frame(frame)

    async def _interrupt(self) -> None:
        await self.broadcast_frame(InterruptionFrame)

    def _keep_users_words(
        self, frame: InterimTranscriptionFrame | TranscriptionFrame
    ) -> tuple[str, str]:
        """The user's words in `frame`, and those of them that count for the barge-in.

        With word times, the user's words are those that end after the barge-in began (the
        frame's text becomes them, unless there are none), and of those the ones the ASR is at
        least `barge_in_min_word_confidence` sure of count: what a small ASR makes of a
        backchannel or a noise ("mm-hm" -> "Bumble.") it is rarely sure of. Without word times
        (or outside a barge-in) the whole text is the user's and counts.
        """
        words = getattr(frame.result, "words", None)
        if self._onset_ms is None or not words:
            return frame.text, frame.text
        users = [w for w in words if w.end_ms > self._onset_ms]
        said = " ".join(w.text.strip() for w in users).strip()
        if said:
            frame.text = said
        least = self._turn.barge_in_min_word_confidence
        return said, " ".join(w.text.strip() for w in users if w.confidence >= least).strip()

    def _counts(self) -> tuple[list[str], int, int]:
        text = " ".join(counted for _, counted in [*self._finals, self._interim])
        return own_words(text, self._turn.backchannels, self._echo())

    def _commanded(self) -> bool:
        """Whether the user said a command (`barge_in_commands`) that is not the bot's echo."""
        return said_any(self._said(), self._turn.barge_in_commands, self._echo())

    def _said(self) -> str:
        return " ".join(users for users, _ in [*self._finals, self._interim]).strip()

    def _echo(self) -> set[str] | None:
        return self._recent_bot_words() if self._recent_bot_words is not None else None

    def _spoken_s(self) -> float:
        """How long the user has certainly spoken in this turn (see the module's docstring)."""
        open_s = 0.0
        if self._vad_since is not None:
            open_s = max(0.0, time.monotonic() - self._vad_since - self._turn.vad_stop_s)
        spoken = self._speech_s + open_s
        if self._floor_s is not None:
            spoken = min(spoken, self._floor_s(self._onset_at))
        return spoken

    async def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            await self.cancel_task(timer)

    async def cleanup(self) -> None:
        """Stop the timers with the pipeline."""
        await super().cleanup()  # type: ignore[no-untyped-call]
        await self._cancel_timer()
        for task in (self._settler, self._pause_timer):
            if task is not None:
                await self.cancel_task(task)
        self._settler = self._pause_timer = None

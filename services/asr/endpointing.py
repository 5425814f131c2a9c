"""Server-side endpointing for clients that never say when an utterance ends (Riva's API).

Riva decides utterance ends itself, from the `EndpointingConfig` of the request: an utterance
starts when at least `start_threshold` of the frames in the last `start_history` ms are speech,
and ends when at least `stop_threshold` of the frames in the last `stop_history` ms are not.
Riva counts frames of its acoustic model's blank symbol; we count 20 ms frames under the energy
gate that the recognizers already use to tell speech from silence (`SILENCE_RMS`), so the same
settings mean the same thing in milliseconds. `stop_history_eou`/`stop_threshold_eou` (Riva's
early end-of-utterance rule) are honoured as a second stop rule: whichever fires first ends the
utterance.

The endpointer also remembers where speech was heard (`VoiceTimeline`), from which word offsets
are estimated.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from services.asr.backends.utterance import SILENCE_RMS
from services.runtime.audio import FloatAudio

FRAME_MS = 20
#: Riva's documented defaults, used for each setting a client leaves at 0.
DEFAULT_START_HISTORY_MS = 300
DEFAULT_START_THRESHOLD = 0.2
DEFAULT_STOP_HISTORY_MS = 800
DEFAULT_STOP_THRESHOLD = 0.98


@dataclass(frozen=True)
class EndpointingRules:
    """Riva's endpointing settings, in milliseconds and fractions of frames."""

    start_history_ms: int = DEFAULT_START_HISTORY_MS
    start_threshold: float = DEFAULT_START_THRESHOLD
    stop_history_ms: int = DEFAULT_STOP_HISTORY_MS
    stop_threshold: float = DEFAULT_STOP_THRESHOLD
    #: The early end-of-utterance rule; 0 turns it off.
    stop_history_eou_ms: int = 0
    stop_threshold_eou: float = DEFAULT_STOP_THRESHOLD


class VoiceTimeline:
    """Where speech was heard in a stream, as merged [start, end) spans in ms."""

    def __init__(self) -> None:
        self.spans: deque[list[float]] = deque()

    def add_frame(self, start_ms: float, end_ms: float) -> None:
        """Mark one voiced frame."""
        if self.spans and self.spans[-1][1] >= start_ms:
            self.spans[-1][1] = end_ms
        else:
            self.spans.append([start_ms, end_ms])

    def speech_within(self, start_ms: float, end_ms: float) -> tuple[float, float] | None:
        """First and last moment of speech in [start_ms, end_ms), or None if all was quiet.

        Spans wholly before `start_ms` are forgotten: results come in stream order.
        """
        while self.spans and self.spans[0][1] <= start_ms:
            self.spans.popleft()
        inside = [(max(a, start_ms), min(b, end_ms)) for a, b in self.spans if a < end_ms]
        if not inside:
            return None
        return inside[0][0], inside[-1][1]


class Endpointer:
    """Decides, frame by frame, where an utterance starts and ends."""

    def __init__(self, rules: EndpointingRules, sample_rate_hz: int = 16000) -> None:
        self.rules = rules
        self.frame = sample_rate_hz * FRAME_MS // 1000
        self.sample_rate_hz = sample_rate_hz
        self.timeline = VoiceTimeline()
        self.in_speech = False
        #: Unvoiced frames in a row, up to the latest.
        self.quiet_frames = 0
        self._tail = np.zeros(0, dtype=np.float32)
        self._frames_seen = 0
        longest = max(rules.start_history_ms, rules.stop_history_ms, rules.stop_history_eou_ms)
        self._history: deque[bool] = deque(maxlen=_frames(longest))

    def push(self, samples: FloatAudio) -> int:
        """Look at the next audio; returns how many utterance ends it contains (usually 0 or 1)."""
        audio = np.concatenate((self._tail, samples)) if self._tail.size else samples
        whole = audio.size // self.frame
        self._tail = audio[whole * self.frame :].copy()
        if not whole:
            return 0
        frames = audio[: whole * self.frame].reshape(whole, self.frame)
        voiced = np.sqrt(np.mean(frames**2, axis=1)) > SILENCE_RMS
        ends = 0
        for is_voiced in voiced.tolist():
            ends += self._step(bool(is_voiced))
        return ends

    @property
    def quiet_ms(self) -> int:
        """How long it has been quiet, in ms (0 right after a voiced frame)."""
        return self.quiet_frames * FRAME_MS

    def _step(self, voiced: bool) -> int:
        start_ms = self._frames_seen * FRAME_MS
        self._frames_seen += 1
        self._history.append(voiced)
        self.quiet_frames = 0 if voiced else self.quiet_frames + 1
        if voiced:
            self.timeline.add_frame(start_ms, start_ms + FRAME_MS)
        rules = self.rules
        if not self.in_speech:
            if _share(self._history, rules.start_history_ms, True) >= rules.start_threshold:
                self.in_speech = True
            return 0
        stop = _share(self._history, rules.stop_history_ms, False) >= rules.stop_threshold
        early = rules.stop_history_eou_ms > 0 and (
            _share(self._history, rules.stop_history_eou_ms, False) >= rules.stop_threshold_eou
        )
        if stop or early:
            self.in_speech = False
            self._history.clear()
            return 1
        return 0


def _frames(history_ms: int) -> int:
    return max(1, math.ceil(history_ms / FRAME_MS))


def _share(history: deque[bool], history_ms: int, value: bool) -> float:
    """Share of the last `history_ms` of frames equal to `value` (0 until the window is full)."""
    count = _frames(history_ms)
    if len(history) < count:
        return 0.0
    recent = list(history)[-count:]
    return sum(1 for frame in recent if frame is value) / count

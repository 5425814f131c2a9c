"""The audio of one utterance, in a buffer of fixed capacity, with an energy gate.

The servicer finalizes utterances at `max_utterance_s`, so a buffer of that capacity (plus the
resampler's tail) never overflows in practice; if it does, the oldest audio is dropped rather
than memory growing. The energy gate marks where the last voiced 20 ms frame ends, which tells a
recognizer that an utterance is silence only (answer empty text, no decode that could
hallucinate), that audio after a decoded prefix is silence (the prefix's text still holds), and
what a final decode should hear (`final_snapshot`): the speech, then a fixed amount of silence.

Silence before the utterance's first voiced frame is trimmed to `PREROLL_S`: a client streams
its microphone all along, so an utterance that begins at the last finalize holds seconds of
silence (the bot's reply, on a headset) before the speech. Whisper spreads a short phrase's words
over that silence (their times came out seconds early: "What is it?" over 2.8-5.9 s for speech
from about 5.6 s) and decodes it again at every interim. Times stay on the utterance's clock: a
recognizer adds `offset_ms` to the times of what it decodes.
"""

from __future__ import annotations

import logging

import numpy as np

from services.runtime.audio import FloatAudio

log = logging.getLogger(__name__)

#: Frames quieter than this RMS (about -46 dBFS) count as silence.
SILENCE_RMS = 0.005
#: A decode "heard everything" only if it also heard this much after the last voiced frame: the
#: soft end of a word (the "s" of "France") can fall under the gate, and a decode cut there
#: hears another word ("friends").
SETTLE_S = 0.15
_FRAME_S = 0.02
#: Silence kept before the first voiced frame: the soft onset of a first word, and the lead-in
#: Whisper expects.
PREROLL_S = 0.3


class UtteranceAudio:
    """Append-only audio of the current utterance, bounded to `capacity_s` seconds."""

    def __init__(self, capacity_s: float, sample_rate_hz: int = 16000) -> None:
        self.sample_rate_hz = sample_rate_hz
        self._buffer = np.zeros(max(1, round(capacity_s * sample_rate_hz)), dtype=np.float32)
        self._frame = round(_FRAME_S * sample_rate_hz)
        self._size = 0
        self.dropped = 0  # samples dropped from the front after an overflow
        self.voiced_end = 0  # end of the last voiced frame, in samples of the buffer
        self.trimmed = 0  # samples of leading silence trimmed: where the buffer starts
        self._preroll = round(PREROLL_S * sample_rate_hz)

    def __len__(self) -> int:
        return self._size

    @property
    def duration_ms(self) -> float:
        """Length of the audio held, in milliseconds."""
        return 1000.0 * self._size / self.sample_rate_hz

    @property
    def offset_ms(self) -> float:
        """Where the audio held starts on the utterance's clock (leading silence trimmed)."""
        return 1000.0 * self.trimmed / self.sample_rate_hz

    @property
    def voiced(self) -> bool:
        """True once any frame rose above the energy gate."""
        return self.voiced_end > 0

    def append(self, samples: FloatAudio) -> None:
        """Add audio at the end (dropping the oldest audio if the buffer is full)."""
        capacity = self._buffer.size
        if samples.size >= capacity:
            self._drop(self._size)
            samples = samples[-capacity:]
        elif self._size + samples.size > capacity:
            self._drop(self._size + samples.size - capacity)
        start = self._size
        was_voiced = self.voiced
        self._buffer[start : start + samples.size] = samples
        self._size += samples.size
        first = self._gate(max(0, start - start % self._frame))
        if not was_voiced:
            self._trim(max(0, (self._size if first is None else first) - self._preroll))

    @property
    def trailing_silence_s(self) -> float:
        """Seconds of silence since the last voiced frame (the whole buffer if none was voiced)."""
        return (self._size - self.voiced_end) / self.sample_rate_hz

    def settled(self, position: int) -> bool:
        """True when a decode of the first `position` samples heard all the speech there is.

        That is: nothing was voiced, or the decode reaches `SETTLE_S` past the last voiced frame
        (or the end of the audio, if that comes sooner).
        """
        if not self.voiced:
            return True
        return position >= min(self._size, self.voiced_end + round(SETTLE_S * self.sample_rate_hz))

    def snapshot(self) -> FloatAudio:
        """A copy of the audio held (safe to hand to another thread)."""
        return self._buffer[: self._size].copy()

    @property
    def heard_end(self) -> int:
        """Where a final decode's real audio ends: `SETTLE_S` past the last voiced frame."""
        return min(self._size, self.voiced_end + round(SETTLE_S * self.sample_rate_hz))

    @property
    def final_key(self) -> tuple[int, int, int]:
        """Equal for two moments exactly when `final_snapshot` gives the same audio at both."""
        return (self.dropped, self.voiced_end, self.heard_end)

    def final_snapshot(self, silence_s: float) -> FloatAudio:
        """The audio a final decode hears, the same however long the caller has been silent.

        The utterance up to `heard_end`, then digital silence up to `silence_s` past the last
        voiced frame. A decode that starts once the speaker has paused `SETTLE_S` is then the
        very decode a finalize sent any time later would run, so it can answer that finalize.
        """
        end = self.heard_end
        padded = max(end, self.voiced_end + round(silence_s * self.sample_rate_hz))
        audio = np.zeros(padded, dtype=np.float32)
        audio[:end] = self._buffer[:end]
        return audio

    def clear(self) -> None:
        """Start a new utterance."""
        self._size = 0
        self.voiced_end = 0
        self.dropped = 0
        self.trimmed = 0

    def _trim(self, count: int) -> None:
        """Drop `count` samples of leading silence."""
        if count <= 0:
            return
        self._buffer[: self._size - count] = self._buffer[count : self._size]
        self._size -= count
        self.trimmed += count
        if self.voiced_end:
            self.voiced_end -= count

    def _drop(self, count: int) -> None:
        if count <= 0:
            return
        log.warning("utterance buffer full; dropping %d ms of its oldest audio", count // 16)
        self._buffer[: self._size - count] = self._buffer[count : self._size]
        self._size -= count
        self.dropped += count
        self.voiced_end = max(0, self.voiced_end - count)

    def _gate(self, start: int) -> int | None:
        """Update `voiced_end` for the frames from `start` (a frame boundary) on.

        Returns where the first voiced frame among them starts (None: none was voiced).
        """
        first: int | None = None
        frames = (self._size - start) // self._frame
        if frames > 0:
            block = self._buffer[start : start + frames * self._frame].reshape(frames, self._frame)
            rms = np.sqrt(np.mean(block**2, axis=1))
            loud = np.flatnonzero(rms > SILENCE_RMS)
            if loud.size:
                first = start + int(loud[0]) * self._frame
                self.voiced_end = max(self.voiced_end, start + (int(loud[-1]) + 1) * self._frame)
        rest_start = start + max(0, frames) * self._frame
        rest = self._buffer[rest_start : self._size]
        if rest.size and float(np.sqrt(np.mean(rest**2))) > SILENCE_RMS:
            self.voiced_end = self._size
            first = rest_start if first is None else first
        return first

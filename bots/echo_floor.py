"""The echo floor: loud, confident speech, which the canceller's residual rarely is.

Where the bot cancels its own echo (a loudspeaker beside the microphone), what the canceller
leaves of the bot's voice passes a quick VAD start now and then, and Whisper makes words of it:
a false barge-in every few minutes. Pipecat's own VAD thresholds (`ECHO_FLOOR`: confidence 0.7,
0.2 s, volume 0.6) hold that residual back, but as the VAD's start they also make every real
barge-in 250-300 ms slower.

So the floor judges the barge-in instead of starting it: the VAD keeps its quick thresholds (the
bot's audio pauses as soon as the user starts), and `FloorVADAnalyzer` notes, from the same
confidence and volume the VAD computes, when the speech has passed the floor's thresholds for
the floor's start time. `bots.barge_in.BargeInGate` confirms a barge-in only on speech that
has: a pause from the residual resumes instead of stopping the bot.

The floor also measures how long the user has spoken (`loud_s_since`): on a loudspeaker the
residual keeps the quick VAD open around the user's words (a 0.27 s "yeah" was 0.6 s by the
VAD), so the barge-in's minimum length (`barge_in_min_s`) counts only speech above the floor.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams

#: The floor's confidence, start (s) and volume: Pipecat's VAD defaults.
ECHO_FLOOR = (0.7, 0.2, 0.6)
#: How many loud chunks the floor remembers for `loud_s_since` (32 ms each: about 16 s).
LOUD_CHUNKS_KEPT = 500


class FloorVADAnalyzer(SileroVADAnalyzer):
    """Silero's VAD that also notes when its speech passes the echo floor.

    Args:
        params: The VAD's own (quick) thresholds.
        floor: The confidence and volume the speech must keep for `floor.start_secs`; default:
            `params` held to `ECHO_FLOOR` (`floor_params`).
    """

    def __init__(self, *, params: VADParams, floor: VADParams | None = None) -> None:
        super().__init__(params=params)
        self.floor = floor or floor_params(params)
        self._confidence = 0.0
        self._loud_chunks = 0
        #: When the speech last stood above the floor for its start time (time.monotonic; the
        #: analyzer runs in a worker thread and a float is written whole, so no lock).
        self.passed_at = -math.inf
        self._loud_at: deque[float] = deque(maxlen=LOUD_CHUNKS_KEPT)
        self._lock = threading.Lock()  # `loud_s_since` reads what the worker thread appends

    def passed_since(self, moment: float) -> bool:
        """Whether speech has passed the floor at or after `moment` (time.monotonic)."""
        return self.passed_at >= moment

    def loud_s_since(self, moment: float) -> float:
        """Seconds of speech above the floor's confidence and volume since `moment`."""
        with self._lock:
            chunks = sum(1 for at in self._loud_at if at >= moment)
        return chunks * self._chunk_s()

    def voice_confidence(self, buffer: bytes) -> float:
        """Silero's confidence, kept for the floor (the volume of the same chunk follows)."""
        self._confidence = super().voice_confidence(buffer)
        return self._confidence

    def _get_smoothed_volume(self, audio: bytes) -> float:
        # Pipecat computes each chunk's confidence, then its smoothed volume: both are known here.
        volume = super()._get_smoothed_volume(audio)
        floor = self.floor
        loud = self._confidence >= floor.confidence and volume >= floor.min_volume
        self._loud_chunks = self._loud_chunks + 1 if loud else 0
        if loud:
            now = time.monotonic()
            with self._lock:
                self._loud_at.append(now)
            if self._loud_chunks * self._chunk_s() >= floor.start_secs:
                self.passed_at = now
        return volume

    def _chunk_s(self) -> float:
        return self.num_frames_required() / self.sample_rate


def floor_params(params: VADParams) -> VADParams:
    """`params` held to the echo floor at least (for a VAD whose start must pass it)."""
    confidence, start_s, volume = ECHO_FLOOR
    return VADParams(
        confidence=max(params.confidence, confidence),
        start_secs=max(params.start_secs, start_s),
        stop_secs=params.stop_secs,
        min_volume=max(params.min_volume, volume),
    )

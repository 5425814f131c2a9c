"""Acoustic echo cancellation: the bot's played audio is the reference for the microphone's.

`TurnSettings.echo_cancellation = "webrtc"` puts two processors into the pipeline around one
`EchoReference`:

- `PlayedAudio`, after the output transport, which pushes every audio frame on once it has
  written it: each one is the far end, in the order and at the pace it was played.
- `EchoCanceller`, right after the input transport (before the VAD and the STT): WebRTC's audio
  processing module (from the `livekit` package) in 10 ms blocks, each block of far end given
  to `process_reverse_stream` just before the microphone's block goes through `process_stream`.
  Both sides meet on the wall clock (`EchoReference`): each microphone block gets the audio that
  played at its moment, a fixed 50 ms earlier (what it takes a transport to report a write), and
  the module's own delay estimator finds the rest of the lag (the playout buffer, the room).

A processor rather than the transport's `audio_in_filter`: the canceller and its reference are
made with the pipeline, for any transport, and the far end is at hand there. The module costs
about 0.25 ms per 10 ms block on a laptop-class CPU, so it runs on the event loop.

`TurnSettings.echo_cancellation = "auto"` (the default) turns it on where the transport's
microphone hears its own loudspeaker (`wants_echo_cancellation`), and off where the client cancels
echo itself: the browser client asks the browser for it (getUserMedia's `echoCancellation`),
as Daily's clients do. A headset has no echo: with none to learn from, the canceller takes the
user's speech during the bot's for echo and mutes it, so turn it off there.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame, StartFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

#: The module's block: it takes exactly 10 ms at a time.
BLOCK_MS = 10
#: How much played audio the reference keeps (a ring; the module looks about half a second back).
REFERENCE_SPAN_S = 2.0
#: The far end given with a microphone block is what played this long before the block: a
#: transport reports a frame once it has written it, up to one output chunk (40 ms) after its
#: sound began, and the reference must reach the module no later than its echo does.
REFERENCE_LAG_S = 0.05
#: Transports (their modules) whose microphone hears the loudspeaker next to it, with no echo
#: cancellation of their own: "auto" cancels echo on them.
ROOM_TRANSPORTS = ("pipecat.transports.local",)


def wants_echo_cancellation(setting: str, transport_input: object) -> bool:
    """Whether the bot cancels echo on `transport_input`, for an `echo_cancellation` setting.

    "auto": on for a transport whose microphone hears its loudspeaker, which it says with a true
    `hears_its_speaker` attribute or by being one of `ROOM_TRANSPORTS`; off for any other (the
    browser's WebRTC and Daily cancel echo in the client, WAV files have no room).
    """
    if setting != "auto":
        return setting == "webrtc"
    if getattr(transport_input, "hears_its_speaker", False):
        return True
    return type(transport_input).__module__.startswith(ROOM_TRANSPORTS)


#: Two clocks (the speaker's writes, the microphone's samples) further apart than this from the
#: wall clock are re-anchored to it: a gap in playback, lost frames, drift.
REANCHOR_S = 0.1


class EchoReference:
    """The played audio on the wall clock, resampled to the microphone's rate.

    The speaker side writes each played frame where it sounded: consecutive frames one after the
    other, re-anchored to the wall clock after a gap. The microphone side reads, for each block
    it cancels, the far end of the same moment `REFERENCE_LAG_S` earlier; the module's delay
    estimator finds the rest of the lag (the playout buffer, the room). What was never played
    reads as silence. The ring is bounded (`REFERENCE_SPAN_S`).
    """

    def __init__(self, lag_s: float = REFERENCE_LAG_S, span_s: float = REFERENCE_SPAN_S) -> None:
        self.lag_s = lag_s
        self.span_s = span_s
        self.sample_rate = 0
        self._origin = 0.0
        self._ring = np.zeros(0, dtype=np.int16)
        self._next_write: int | None = None  # where the next consecutive frame starts
        self._resamplers: dict[int, soxr.ResampleStream] = {}
        self.played_samples = 0

    def start(self, sample_rate: int) -> None:
        """Take far end at `sample_rate` (the microphone's) from now on."""
        self.sample_rate = sample_rate
        self._origin = time.perf_counter()
        self._ring = np.zeros(int(self.span_s * sample_rate), dtype=np.int16)
        self._next_write = None

    def index(self, moment: float) -> int:
        """The sample index of wall-clock `moment` (perf_counter seconds)."""
        return round((moment - self._origin) * self.sample_rate)

    def played(self, audio: bytes, sample_rate: int, ended_at: float | None = None) -> None:
        """Add audio the transport has just finished writing (16-bit mono at `sample_rate`)."""
        if not self.sample_rate or not audio:
            return
        samples = np.frombuffer(audio, dtype=np.int16)
        if sample_rate != self.sample_rate:
            resampler = self._resamplers.get(sample_rate)
            if resampler is None:
                resampler = soxr.ResampleStream(sample_rate, self.sample_rate, 1, dtype="int16")
                self._resamplers[sample_rate] = resampler
            samples = resampler.resample_chunk(samples)
        ended_at = time.perf_counter() if ended_at is None else ended_at
        at = self.index(ended_at) - len(samples)
        if self._next_write is not None and abs(at - self._next_write) < REANCHOR_S * (
            self.sample_rate
        ):
            at = self._next_write
        self._next_write = at + len(samples)
        self._put(at, samples[-len(self._ring) :])
        self.played_samples += len(samples)

    def read(self, end: int, samples: int) -> np.ndarray:
        """The far end of microphone samples [end - samples, end), and forget it."""
        start = end - round(self.lag_s * self.sample_rate) - samples
        slots = np.arange(start, start + samples) % len(self._ring)
        block = self._ring[slots].copy()
        self._ring[slots] = 0  # read once: the ring never replays old audio
        return block

    def _put(self, at: int, samples: np.ndarray) -> None:
        slots = np.arange(at, at + len(samples)) % len(self._ring)
        self._ring[slots] = samples


def _audio_processing_module() -> Any:
    try:
        from livekit import rtc
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise RuntimeError(
            "echo cancellation needs the `livekit` package (WebRTC's audio processing module): "
            "uv sync, or pip install livekit"
        ) from err
    return rtc


class EchoCanceller(FrameProcessor):
    """Cancels the bot's echo in the microphone's audio frames, in place.

    Args:
        reference: Where `PlayedAudio` puts the audio the transport played.
        noise_suppression: Also suppress stationary noise (off: the VAD and ASR are trained on
            noisy audio, and suppression can clip word onsets).
        **kwargs: Passed to `FrameProcessor`.
    """

    def __init__(
        self, reference: EchoReference, *, noise_suppression: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.reference = reference
        self._noise_suppression = noise_suppression
        self._rtc = _audio_processing_module()
        self._apm: Any = None
        self._rate = 0
        self._mic_end: int | None = None  # the reference index where the next mic sample ends
        self.blocks = 0

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Learn the microphone's rate."""
        await super().setup(setup)
        self._rate = setup.audio_in_sample_rate

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Cancel the echo in microphone audio; pass everything on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self._start(self._rate)
        elif isinstance(frame, InputAudioRawFrame) and self._apm is not None:
            frame.audio = self._cancel(frame.audio, frame.sample_rate, frame.num_channels)
        await self.push_frame(frame, direction)

    def _start(self, sample_rate: int) -> None:
        self._rate = sample_rate
        self.reference.start(sample_rate)
        self._apm = self._rtc.AudioProcessingModule(
            echo_cancellation=True,
            noise_suppression=self._noise_suppression,
            high_pass_filter=True,
            auto_gain_control=False,
        )
        logger.info(f"{self}: WebRTC echo cancellation on the microphone at {sample_rate} Hz")

    def _cancel(self, audio: bytes, sample_rate: int, channels: int) -> bytes:
        if sample_rate != self._rate or channels != 1:
            return audio  # not the stream the module was set up for: leave it as it is
        block = sample_rate * BLOCK_MS // 1000
        out = bytearray(audio)
        step = 2 * block
        # The microphone's own clock: its samples follow one another; the wall clock only
        # anchors them (at the first frame, and after a gap or drift past REANCHOR_S).
        first = self.reference.index(time.perf_counter()) - len(audio) // 2
        mic_end = self._mic_end if self._mic_end is not None else first
        if abs(first - mic_end) > REANCHOR_S * sample_rate:
            mic_end = first
        # Whole blocks only: transports deliver 10 or 20 ms frames; a tail (none in practice)
        # passes unchanged rather than shifting the stream.
        for at in range(0, len(out) - step + 1, step):
            mic_end += block
            far = self.reference.read(mic_end, block)
            self._apm.process_reverse_stream(
                self._rtc.AudioFrame(far.tobytes(), sample_rate, 1, block)
            )
            near = self._rtc.AudioFrame(bytes(out[at : at + step]), sample_rate, 1, block)
            self._apm.process_stream(near)
            out[at : at + step] = bytes(near.data)
            self.blocks += 1
        self._mic_end = mic_end
        return bytes(out)


class PlayedAudio(FrameProcessor):
    """After the output transport: hands each played audio frame to the echo reference."""

    def __init__(self, reference: EchoReference, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference = reference

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Note played audio; pass everything on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            self.reference.played(frame.audio, frame.sample_rate)
        await self.push_frame(frame, direction)

"""Acoustic echo cancellation: the bot's outgoing audio is the reference for the microphone's.

`TurnSettings.echo_cancellation = "webrtc"` puts two processors into the pipeline around one
`EchoReference`:

- `SpeakerTap`, right before the output transport, which notes every audio frame as it is
  handed over: the far end, in the order the transport will play it.
- `EchoCanceller`, right after the input transport (before the VAD and the STT): WebRTC's audio
  processing module (from the `livekit` package) in 10 ms blocks, each block of far end given
  to `process_reverse_stream` just before the microphone's block goes through `process_stream`.
  Both sides meet on the wall clock (`EchoReference`): each microphone block gets the audio
  scheduled for its moment, and the module's delay estimator finds the lag (the transport's
  queue, the device's buffer, the room).

Why before the transport and not after it: the module models echo as the far end it was given,
delayed; far end that reaches it after its echo is of no use. A transport reports a frame only
once it has written it, and the report reaches a processor after it through queues on the event
loop, so on a busy host it came 50-200 ms late, later than the echo of a speaker 60-100 ms from
the microphone: the echo of those moments went through uncancelled and the VAD took it for the
user. Handed-over audio is never later than its sound (a transport cannot play what it has not
been given), only earlier, which the delay estimator absorbs.

A processor rather than the transport's `audio_in_filter`: the canceller and its reference are
made with the pipeline, for any transport, and the far end is at hand there. The module costs
about 0.4 ms of CPU per 10 ms block (a 2-core AMD EPYC), so it runs on the event loop.

`TurnSettings.echo_cancellation = "auto"` (the default) turns it on where the transport's
microphone hears its own loudspeaker (`wants_echo_cancellation`), and off where the client cancels
echo itself: the browser client asks the browser for it (getUserMedia's `echoCancellation`),
as Daily's clients do. A headset has no echo: with none to learn from, the canceller takes the
user's speech during the bot's for echo and mutes it, so turn it off there.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

#: The module's block: it takes exactly 10 ms at a time.
BLOCK_MS = 10
#: How much outgoing audio the reference holds ahead of the microphone at most: a reply handed
#: over faster than it plays (no playout gate) waits here; beyond it, the oldest goes.
REFERENCE_SPAN_S = 120.0
#: What a transport may still play of its current chunk after an interruption (Pipecat's output
#: transports write 40 ms at a time).
CHUNK_TAIL_S = 0.04
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


#: The microphone's clock this far behind the wall clock is re-anchored to it: a gap in its
#: frames (a muted or paused transport), not a busy moment. Frames held up by a busy event loop
#: (200 ms and more on a loaded host) come in a burst later; they were captured back then, and
#: moving the clock forward for them shifted every block after it against its far end.
MIC_GAP_S = 1.0


class EchoReference:
    """The bot's outgoing audio on the wall clock, resampled to the microphone's rate.

    The speaker side schedules each frame as it is handed to the transport: at the later of now
    and the end of the frame before (a transport plays its frames back to back, none before it
    has it). The microphone side reads, for each block it cancels, the far end scheduled for the
    same moment; what was never handed over reads as silence. An interruption drops what the
    transport will not play (`interrupted`).
    """

    def __init__(self, span_s: float = REFERENCE_SPAN_S) -> None:
        self.span_s = span_s
        self.sample_rate = 0
        self._origin = 0.0
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (first sample index, samples)
        self._queued = 0  # samples in _chunks
        self._next: int | None = None  # where the next frame handed over starts, at the earliest
        self._resamplers: dict[int, soxr.ResampleStream] = {}
        self.handed_samples = 0

    def start(self, sample_rate: int) -> None:
        """Take far end at `sample_rate` (the microphone's) from now on."""
        self.sample_rate = sample_rate
        self._origin = time.perf_counter()
        self._chunks.clear()
        self._queued = 0
        self._next = None

    def index(self, moment: float) -> int:
        """The sample index of wall-clock `moment` (perf_counter seconds)."""
        return round((moment - self._origin) * self.sample_rate)

    def handed(self, audio: bytes, sample_rate: int, at: float | None = None) -> None:
        """Schedule audio handed to the transport at `at` (now) (16-bit mono at `sample_rate`)."""
        if not self.sample_rate or not audio:
            return
        samples = np.frombuffer(audio, dtype=np.int16)
        if sample_rate != self.sample_rate:
            resampler = self._resamplers.get(sample_rate)
            if resampler is None:
                resampler = soxr.ResampleStream(sample_rate, self.sample_rate, 1, dtype="int16")
                self._resamplers[sample_rate] = resampler
            samples = resampler.resample_chunk(samples)
        if not len(samples):
            return
        now = self.index(time.perf_counter() if at is None else at)
        start = now if self._next is None else max(now, self._next)
        self._chunks.append((start, samples))
        self._queued += len(samples)
        self._next = start + len(samples)
        self.handed_samples += len(samples)
        limit = int(self.span_s * self.sample_rate)
        while self._queued > limit and len(self._chunks) > 1:
            self._queued -= len(self._chunks.popleft()[1])

    def interrupted(self, at: float | None = None) -> None:
        """The transport dropped what it held: forget what it will not play after `at` (now)."""
        if not self.sample_rate:
            return
        cut = self.index(time.perf_counter() if at is None else at) + round(
            CHUNK_TAIL_S * self.sample_rate
        )
        while self._chunks and self._chunks[-1][0] >= cut:
            self._queued -= len(self._chunks.pop()[1])
        if self._chunks:
            start, samples = self._chunks[-1]
            if start + len(samples) > cut:
                self._chunks[-1] = (start, samples[: cut - start])
                self._queued -= start + len(samples) - cut
        self._next = None

    def read(self, end: int, samples: int) -> np.ndarray:
        """The far end of microphone samples [end - samples, end); older audio is forgotten."""
        start = end - samples
        block = np.zeros(samples, dtype=np.int16)
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= start:
            self._queued -= len(self._chunks.popleft()[1])
        for at, chunk in self._chunks:
            if at >= end:
                break
            lo, hi = max(at, start), min(at + len(chunk), end)
            block[lo - start : hi - start] = chunk[lo - at : hi - at]
        return block


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
        reference: Where `SpeakerTap` schedules the audio handed to the transport.
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
        # The microphone's own clock: its samples follow one another, anchored to the wall
        # clock at the first frame and after a gap (MIC_GAP_S). Never ahead of the wall clock:
        # a frame cannot have been captured after it arrived, and a clock anchored on a late
        # first frame (frames queued before the pipeline started) would read the far end
        # before it is handed over.
        first = self.reference.index(time.perf_counter()) - len(audio) // 2
        mic_end = self._mic_end if self._mic_end is not None else first
        if mic_end > first or first - mic_end > MIC_GAP_S * sample_rate:
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


class SpeakerTap(FrameProcessor):
    """Before the output transport: schedules each audio frame handed to it in the reference."""

    def __init__(self, reference: EchoReference, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference = reference

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Note outgoing audio and interruptions; pass everything on."""
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, OutputAudioRawFrame):
                self.reference.handed(frame.audio, frame.sample_rate)
            elif isinstance(frame, InterruptionFrame):
                self.reference.interrupted()
        await self.push_frame(frame, direction)

"""A real-time loopback transport for the conversation benchmark: a speaker that leaks into the mic.

The speaker (`PlayingOutput`) consumes the bot's audio at the clock's pace, so that what it
recorded as played was played, and keeps each chunk's start time. Every chunk it plays also goes,
resampled to the microphone's rate, into an `EchoPath`: a bounded delay line that the microphone
(`LoopbackInput`) reads `delay_s` later, attenuated to the echo level, and mixes with the scripted
user speech it plays in 20 ms frames. Times are `time.perf_counter()` seconds and mean the
acoustic moment: a microphone frame pushed at t holds the sound of [t - 20 ms, t].
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import soxr
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from loadtest.conversation_quality_scripts import RATE, Speech
from services.runtime.audio import float_to_pcm16, pcm16_to_float

FRAME_S = 0.02
FRAME_SAMPLES = round(RATE * FRAME_S)
#: A pause longer than this between two played chunks starts a new run of speech.
RUN_GAP_S = 0.05
#: The delay line holds this much audio; the echo delay and a chunk must fit in it.
ECHO_LINE_S = 4.0
#: Utterances waiting for the microphone (a script queues one or two ahead).
MAX_QUEUED = 8


def gain_of(echo_db: float | None) -> float:
    """Linear gain of an echo level in dB; None is no echo."""
    return 0.0 if echo_db is None else 10 ** (echo_db / 20)


class EchoPath:
    """The acoustic path from the speaker to the microphone: a delay line of 16 kHz samples.

    The speaker writes what it plays at the sample index of the moment it plays it; the
    microphone reads consecutive frames `delay_s` behind. What was read is cleared, so a ring
    of `ECHO_LINE_S` never replays old sound.
    """

    def __init__(self, delay_s: float, gain: float, origin: float) -> None:
        self.delay_s = delay_s
        self.gain = gain
        self._origin = origin
        self._line = np.zeros(round(ECHO_LINE_S * RATE), dtype=np.float32)
        self._read = 0  # absolute index of the next sample the microphone reads

    def index(self, moment: float) -> int:
        """Absolute sample index of `moment`."""
        return round((moment - self._origin) * RATE)

    def start_reading(self, first_frame_end: float) -> None:
        """The microphone's first frame ends at `first_frame_end`."""
        self._read = self.index(first_frame_end - self.delay_s) - FRAME_SAMPLES

    def write(self, at: int, samples: np.ndarray) -> None:
        """Add `samples` (played from absolute index `at`) to the line."""
        if self.gain == 0.0 or samples.size == 0:
            return
        skip = max(0, self._read - at)  # already read: too late to be heard
        samples, at = samples[skip:], at + skip
        size = min(samples.size, self._line.size - (at - self._read))
        if size <= 0:
            return
        where = (at + np.arange(size)) % self._line.size
        self._line[where] += self.gain * samples[:size]

    def read(self) -> np.ndarray:
        """The next microphone frame's worth of echo."""
        where = (self._read + np.arange(FRAME_SAMPLES)) % self._line.size
        frame = self._line[where].copy()
        self._line[where] = 0.0
        self._read += FRAME_SAMPLES
        return frame


@dataclass
class Spoken:
    """An utterance the microphone played, and when its speech started and ended."""

    speech: Speech
    started_at: float = math.nan  # the audio's first sample
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def speech_start(self) -> float:
        """When the words start (acoustic time)."""
        return self.started_at + self.speech.onset_s

    @property
    def speech_end(self) -> float:
        """When the words end."""
        return self.started_at + self.speech.offset_s


class LoopbackInput(BaseInputTransport):
    """A microphone: queued user speech plus the speaker's echo, at real time, 20 ms frames."""

    def __init__(self, params: TransportParams, echo: EchoPath, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._echo = echo
        self._queue: asyncio.Queue[Spoken] = asyncio.Queue(MAX_QUEUED)
        self._task: asyncio.Task[None] | None = None

    @property
    def hears_its_speaker(self) -> bool:
        """Whether the bot's own voice reaches this microphone (an echo level was set).

        The bots' "auto" echo cancellation turns on for it (`bots.echo.wants_echo_cancellation`).
        """
        return self._echo.gain > 0.0

    async def say(self, speech: Speech) -> Spoken:
        """Queue `speech` after what is queued; returns its record, filled as it plays."""
        spoken = Spoken(speech)
        await self._queue.put(spoken)
        return spoken

    async def start(self, frame: StartFrame) -> None:
        """Start the microphone."""
        await super().start(frame)
        if self.sample_rate != RATE:
            raise ValueError(f"the loopback microphone runs at {RATE} Hz, not {self.sample_rate}")
        await self.set_transport_ready(frame)
        self._task = self.create_task(self._play(), "loopback-input")

    async def stop(self, frame: EndFrame) -> None:
        """Stop the microphone."""
        await self._stop_task()
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame) -> None:
        """Stop the microphone at once."""
        await self._stop_task()
        await super().cancel(frame)

    async def _stop_task(self) -> None:
        if self._task is not None:
            await self.cancel_task(self._task)
            self._task = None

    async def _play(self) -> None:
        next_at = time.perf_counter() + FRAME_S
        self._echo.start_reading(next_at)
        current: Spoken | None = None
        samples = np.zeros(0, dtype=np.float32)
        offset = 0
        while True:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if current is not None and offset >= samples.size:
                current.done.set()
                current = None
            if current is None and not self._queue.empty():
                current = self._queue.get_nowait()
                current.started_at = next_at - FRAME_S
                samples, offset = pcm16_to_float(current.speech.pcm), 0
            frame = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            if current is not None:
                part = samples[offset : offset + FRAME_SAMPLES]
                frame[: part.size] = part
                offset += FRAME_SAMPLES
            frame += self._echo.read()
            pcm = float_to_pcm16(np.clip(frame, -1.0, 1.0))
            await self.push_audio_frame(InputAudioRawFrame(pcm, RATE, 1))
            next_at += FRAME_S


@dataclass(frozen=True)
class PlayedChunk:
    """One chunk the speaker played: from `start` for `duration` seconds."""

    start: float
    duration: float
    pcm: bytes  # empty unless the output keeps audio

    @property
    def end(self) -> float:
        """When it finished playing."""
        return self.start + self.duration


class PlayingOutput(BaseOutputTransport):
    """A speaker that plays at the clock's pace, records what it played, and feeds the echo."""

    def __init__(
        self, params: TransportParams, echo: EchoPath, keep_audio: bool, **kwargs: object
    ) -> None:
        super().__init__(params, **kwargs)
        self._echo = echo
        self._keep_audio = keep_audio
        self.chunks: list[PlayedChunk] = []
        self.interruptions: list[float] = []  # when an InterruptionFrame reached the speaker
        self._play_end = 0.0
        self._resampler: soxr.ResampleStream | None = None
        self._echo_at = 0

    async def start(self, frame: StartFrame) -> None:
        """Ready to play."""
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Note interruptions as they reach the speaker."""
        if isinstance(frame, InterruptionFrame):
            self.interruptions.append(time.perf_counter())
        await super().process_frame(frame, direction)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Play one chunk: it starts when the previous one ends (or now) and lasts its length."""
        now = time.perf_counter()
        rate = frame.sample_rate
        duration = len(frame.audio) / 2 / rate
        continues = now - self._play_end < RUN_GAP_S
        start = max(now, self._play_end) if continues else now
        self._play_end = start + duration
        self.chunks.append(PlayedChunk(start, duration, frame.audio if self._keep_audio else b""))
        self._feed_echo(frame.audio, rate, start, continues)
        await asyncio.sleep(max(0.0, self._play_end - time.perf_counter()))
        return True

    def _feed_echo(self, pcm: bytes, rate: int, start: float, continues: bool) -> None:
        if self._echo.gain == 0.0:
            return
        if not continues or self._resampler is None:
            # A new run of speech: a fresh resampler, written from the run's first moment.
            self._resampler = soxr.ResampleStream(rate, RATE, 1, dtype="float32")
            self._echo_at = self._echo.index(start)
        samples = self._resampler.resample_chunk(pcm16_to_float(pcm))
        self._echo.write(self._echo_at, samples)
        self._echo_at += samples.size

    def audio_between(self, start: float, end: float) -> bytes:
        """PCM of the chunks that started in [start, end) (needs `keep_audio`)."""
        return b"".join(c.pcm for c in self.chunks if start <= c.start < end)

    def played_s(self, start: float = 0.0, end: float = math.inf) -> float:
        """Seconds of audio played by chunks that started in [start, end)."""
        return sum(c.duration for c in self.chunks if start <= c.start < end)

    def first_after(self, moment: float) -> PlayedChunk | None:
        """The first chunk that started after `moment`."""
        return next((c for c in self.chunks if c.start > moment), None)

    def playing_at(self, moment: float, slack_s: float = RUN_GAP_S) -> bool:
        """Whether a chunk was playing at `moment`, or ended at most `slack_s` before it."""
        return any(c.start <= moment < c.end + slack_s for c in reversed(self.chunks[-200:]))

    def stopped_after(self, moment: float, gap_s: float = RUN_GAP_S) -> float:
        """When the speech playing at `moment` stopped: its next silence of `gap_s` or more."""
        end = moment
        for chunk in self.chunks:  # in the order played
            if chunk.start <= moment:
                end = max(end, chunk.end)
            elif chunk.start < end + gap_s:
                end = chunk.end  # the speech goes on
            else:
                break
        return end

    def gaps(self, start: float, end: float, gap_s: float) -> list[float]:
        """Starts of the silences of `gap_s` or more, between two chunks, begun in [start, end)."""
        chunks = [c for c in self.chunks if c.end >= start - gap_s]
        return [
            a.end for a, b in pairwise(chunks) if start <= a.end < end and b.start - a.end >= gap_s
        ]


class LoopbackTransport(BaseTransport):
    """The microphone and the speaker of one benchmark conversation, joined by an echo path."""

    def __init__(self, echo_db: float | None, delay_s: float, keep_audio: bool = True) -> None:
        super().__init__()
        self.params = TransportParams(audio_in_enabled=True, audio_out_enabled=True)
        self.echo = EchoPath(delay_s, gain_of(echo_db), time.perf_counter())
        self._input = LoopbackInput(self.params, self.echo, name="loopback-input")
        self._output = PlayingOutput(self.params, self.echo, keep_audio, name="loopback-output")

    def input(self) -> LoopbackInput:
        """The microphone."""
        return self._input

    def output(self) -> PlayingOutput:
        """The speaker."""
        return self._output

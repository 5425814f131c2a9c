"""A WAV transport whose speaker leaks into its microphone: the bot hears its own voice.

`EchoWavTransport` is `bots.wav_transport.WavFileTransport` with an echo path: every chunk the
speaker plays goes, resampled to the microphone's rate and attenuated by `echo_db`, into a
ring on the wall clock that the microphone mixes into its frames `delay_s` later (a room, or a
laptop's speaker and microphone: a constant delay, whatever the speaker's pauses). A test
double of an acoustic path, for the echo tests.
"""

from __future__ import annotations

import time

import numpy as np
import soxr
from pipecat.frames.frames import InputAudioRawFrame, OutputAudioRawFrame
from pipecat.transports.base_transport import TransportParams

from bots.wav_transport import BufferOutput, WavFileTransport, WavInput

#: The acoustic path remembers this much sound (a ring, on the wall clock).
SPAN_S = 4.0
#: A write or read further than this from where the last one ended is re-anchored to the clock.
REANCHOR_S = 0.1


class EchoPath:
    """The room: what the speaker played at t is in the microphone at t + `delay_s`, scaled."""

    def __init__(self, gain: float, delay_s: float, rate: int = 16000) -> None:
        self.gain = gain
        self.delay_s = delay_s
        self.rate = rate
        self._origin = time.perf_counter()
        self._ring = np.zeros(int(SPAN_S * rate), dtype=np.float32)
        self._resampler: soxr.ResampleStream | None = None
        self._next_write: int | None = None
        self._next_read: int | None = None
        self.heard_samples = 0  # microphone samples that carried echo

    def _index(self, moment: float) -> int:
        return round((moment - self._origin) * self.rate)

    def played(self, pcm: bytes, rate: int, started_at: float) -> None:
        samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32)
        if rate != self.rate:
            if self._resampler is None:
                self._resampler = soxr.ResampleStream(rate, self.rate, 1, dtype="float32")
            samples = self._resampler.resample_chunk(samples)
        at = self._index(started_at + self.delay_s)
        if self._next_write is not None and abs(at - self._next_write) < REANCHOR_S * self.rate:
            at = self._next_write  # the speaker plays its chunks back to back
        self._next_write = at + len(samples)
        slots = np.arange(at, at + len(samples)) % len(self._ring)
        self._ring[slots] += samples * self.gain

    def mix(self, pcm: bytes, ended_at: float) -> bytes:
        near = np.frombuffer(pcm, dtype=np.int16).astype(np.float32)
        start = self._index(ended_at) - len(near)
        if self._next_read is not None and abs(start - self._next_read) < REANCHOR_S * self.rate:
            start = self._next_read  # the microphone's samples follow one another
        self._next_read = start + len(near)
        slots = np.arange(start, start + len(near)) % len(self._ring)
        echo = self._ring[slots]
        self._ring[slots] = 0.0
        self.heard_samples += int(np.count_nonzero(echo))
        return np.clip(near + echo, -32768, 32767).astype(np.int16).tobytes()


class EchoInput(WavInput):
    """The WAV microphone, with the echo mixed in."""

    def __init__(self, params: TransportParams, speech: bytes, echo: EchoPath, **kwargs: object):
        super().__init__(params, speech, **kwargs)
        self.echo = echo

    async def push_audio_frame(self, frame: InputAudioRawFrame) -> None:
        frame.audio = self.echo.mix(frame.audio, time.perf_counter())
        await super().push_audio_frame(frame)


class EchoOutput(BufferOutput):
    """The recording speaker, feeding the echo path."""

    def __init__(self, params: TransportParams, echo: EchoPath, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.echo = echo

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        self.echo.played(frame.audio, frame.sample_rate, time.perf_counter())
        return await super().write_audio_frame(frame)


class EchoWavTransport(WavFileTransport):
    """`WavFileTransport` whose speaker is heard by its microphone at `echo_db`, `delay_s` late."""

    def __init__(self, speech: bytes, echo_db: float = -10.0, delay_s: float = 0.05) -> None:
        super().__init__(speech)
        self.echo = EchoPath(10 ** (echo_db / 20), delay_s)
        self._input = EchoInput(self.params, speech, self.echo, name="echo-wav-input")
        self._output = EchoOutput(self.params, self.echo, name="echo-buffer-output")

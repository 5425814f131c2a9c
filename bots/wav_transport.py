"""A Pipecat transport whose microphone is a WAV file and whose speaker is a buffer.

`nemotron-speech talk` runs one turn through the real pipeline with it, and the tests drive whole
conversations with it. The input plays its audio at real time in 20 ms frames and then keeps
sending silence, as a live microphone does (the VAD needs the silence to see the user stop); more
speech can be queued while it runs (an interruption). The output plays at real time too, so that
an interruption cuts the reply where a listener would have heard it cut.
"""

from __future__ import annotations

import asyncio
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    InputAudioRawFrame,
    OutputAudioRawFrame,
    StartFrame,
)
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from services.runtime.audio import float_to_pcm16, pcm16_to_float, resample

FRAME_MS = 20

#: Utterances that may wait behind the one playing. A script queues one or two ahead of the
#: microphone; the bound keeps a runaway script from piling up audio, and `say` waits for room
#: rather than dropping: each entry is a whole scripted utterance, and losing one would change
#: the conversation under test. (Frame-level back-pressure is not needed: the microphone makes
#: its frames itself, at real time, so none pile up.)
MAX_QUEUED_UTTERANCES = 8


def read_wav(path: Path, sample_rate: int) -> bytes:
    """A mono 16-bit WAV file as PCM at `sample_rate` (downmixed and resampled as needed)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV files are supported")
        channels, rate = wav.getnchannels(), wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
    pcm = samples.tobytes()
    if rate != sample_rate:
        pcm = float_to_pcm16(resample(pcm16_to_float(pcm), rate, sample_rate))
    return pcm


def write_wav(path: Path, pcm: bytes, sample_rate: int) -> None:
    """Write mono 16-bit PCM as a WAV file."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)


@dataclass
class PlayedAudio:
    """What the speaker played: the PCM and when each chunk started (perf_counter seconds)."""

    sample_rate: int = 0
    chunks: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def pcm(self) -> bytes:
        """All audio played, in order."""
        return b"".join(chunk for _, chunk in self.chunks)

    def after(self, moment: float) -> bytes:
        """Audio whose playback started after `moment`."""
        return b"".join(chunk for at, chunk in self.chunks if at > moment)


class WavInput(BaseInputTransport):
    """Plays queued speech at real time, silence in between."""

    def __init__(self, params: TransportParams, speech: bytes = b"", **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._speech: asyncio.Queue[bytes] = asyncio.Queue(MAX_QUEUED_UTTERANCES)
        if speech:
            self._speech.put_nowait(speech)  # the first of an empty queue
        self._task: asyncio.Task[None] | None = None
        self.speech_ended_at: list[float] = []

    async def say(self, pcm: bytes) -> None:
        """Queue speech; it plays after what is queued before it.

        Waits while `MAX_QUEUED_UTTERANCES` are already waiting, until the microphone takes the
        next one (when the one playing ends).
        """
        await self._speech.put(pcm)

    async def start(self, frame: StartFrame) -> None:
        """Start the microphone once the pipeline runs."""
        await super().start(frame)
        await self.set_transport_ready(frame)
        self._task = self.create_task(self._play(), "wav-input")

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
        rate = self.sample_rate
        frame_bytes = rate * FRAME_MS // 1000 * 2
        silence = bytes(frame_bytes)
        next_at = time.perf_counter()
        pcm, offset = b"", 0
        while True:
            if offset >= len(pcm):
                if pcm:
                    self.speech_ended_at.append(time.perf_counter())
                pcm, offset = (
                    (self._speech.get_nowait(), 0) if not self._speech.empty() else (b"", 0)
                )
            chunk = pcm[offset : offset + frame_bytes] if pcm else silence
            offset += frame_bytes
            chunk = chunk.ljust(frame_bytes, b"\0")
            await self.push_audio_frame(InputAudioRawFrame(chunk, rate, 1))
            next_at += FRAME_MS / 1000
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


class BufferOutput(BaseOutputTransport):
    """A speaker that records what it plays, at real time."""

    def __init__(self, params: TransportParams, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.played = PlayedAudio()

    async def start(self, frame: StartFrame) -> None:
        """Ready to play."""
        await super().start(frame)
        self.played.sample_rate = self.sample_rate
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Play one chunk: record it, then take as long as it lasts."""
        self.played.chunks.append((time.perf_counter(), frame.audio))
        await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)
        return True


class WavFileTransport(BaseTransport):
    """Microphone from a WAV file (and whatever `say` queues), speaker into a buffer."""

    def __init__(self, speech: bytes = b"", params: TransportParams | None = None) -> None:
        super().__init__()
        self.params = params or TransportParams(audio_in_enabled=True, audio_out_enabled=True)
        self._input = WavInput(self.params, speech, name="wav-input")
        self._output = BufferOutput(self.params, name="buffer-output")

    def input(self) -> WavInput:
        """The microphone."""
        return self._input

    def output(self) -> BufferOutput:
        """The speaker."""
        return self._output

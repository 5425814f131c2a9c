"""PCM conversion and streaming resampling shared by the ASR input and TTS output paths."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

FloatAudio = npt.NDArray[np.float32]

_INT16_SCALE = 32768.0


def pcm16_to_float(data: bytes) -> FloatAudio:
    """Little-endian int16 PCM bytes (even length) -> float32 samples in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / _INT16_SCALE


def float_to_pcm16(samples: npt.NDArray[np.floating]) -> bytes:
    """Float samples -> little-endian int16 PCM bytes, clipped rather than wrapped."""
    scaled = np.clip(np.asarray(samples, dtype=np.float32) * _INT16_SCALE, -32768, 32767)
    return bytes(scaled.astype("<i2").tobytes())


def duration_ms(samples: int, sample_rate_hz: int) -> float:
    """Length of `samples` samples in milliseconds."""
    return 1000.0 * samples / sample_rate_hz


class PcmAssembler:
    """Turns LINEAR16 chunks of any byte length into whole samples.

    An odd trailing byte is kept and joined with the next chunk, so a client that splits frames
    at arbitrary byte offsets loses nothing.
    """

    def __init__(self) -> None:
        self._carry = b""

    def push(self, data: bytes) -> FloatAudio:
        """Samples completed by `data` (possibly none)."""
        data = self._carry + data
        whole = len(data) - (len(data) % 2)
        self._carry = data[whole:]
        return pcm16_to_float(data[:whole])

    @property
    def pending_bytes(self) -> int:
        """Bytes held back for the next chunk (0 or 1)."""
        return len(self._carry)


class StreamResampler:
    """Streaming sample-rate conversion (libsoxr, high quality) that keeps its filter state.

    Passes audio through untouched when the rates match. `flush()` returns the filter's tail and
    readies the resampler for the next utterance.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = self._new_stream()

    def push(self, samples: FloatAudio) -> FloatAudio:
        """Resampled audio for `samples`; may lag slightly behind the input (filter delay)."""
        if self._stream is None or samples.size == 0:
            return samples
        out: FloatAudio = self._stream.resample_chunk(samples)
        return out

    def flush(self) -> FloatAudio:
        """The audio still held in the filter; the next push starts a fresh stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail: FloatAudio = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream = self._new_stream()
        return tail

    def _new_stream(self) -> soxr.ResampleStream | None:
        if self.in_rate == self.out_rate:
            return None
        return soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality="HQ")


def resample(samples: FloatAudio, in_rate: int, out_rate: int) -> FloatAudio:
    """Resample a whole buffer at once."""
    if in_rate == out_rate or samples.size == 0:
        return samples
    out: FloatAudio = soxr.resample(samples, in_rate, out_rate, quality="HQ").astype(np.float32)
    return out

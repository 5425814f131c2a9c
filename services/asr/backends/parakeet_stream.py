"""Incremental features and chunking for cache-aware streaming (no NeMo model state here).

The usual cache-aware loop runs the preprocessor over the whole utterance every step (quadratic
in its length) and keeps every feature frame. Here each step computes only the new mel frames,
from a short window of raw audio ending where the audio ends; a frame is emitted once its STFT
window lies wholly inside the audio, so its value is exactly what the offline pass computes.
At finalize the last frames are computed with the preprocessor's own end padding, again exactly
as offline. What a stream keeps is bounded by a few STFT windows of audio and one chunk of frames
(plus the pre-encode cache), whatever the utterance's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.runtime.audio import FloatAudio

# torch and NeMo come with the nemo extra; without it mypy finds neither (hence the ignores).
try:
    import torch  # type: ignore[import-not-found, unused-ignore]
except ImportError as err:
    raise ImportError(
        "the nemo backend needs torch and NeMo: pip install 'nemotron-speech-mesh[nemo]'"
    ) from err


class IncrementalFeatures:
    """Mel frames of a growing utterance, computed once each, equal to the offline pass's.

    `preprocessor` is the model's AudioToMelSpectrogramPreprocessor (center STFT, no per-
    utterance normalization, which streaming cannot reproduce).
    """

    def __init__(self, preprocessor: Any, device: torch.device) -> None:
        featurizer = preprocessor.featurizer
        if getattr(featurizer, "exact_pad", False):
            raise ValueError("incremental features need the centered STFT (exact_pad=False)")
        self.preprocessor = preprocessor
        self.device = device
        self.hop = int(featurizer.hop_length)
        self.half_window = int(featurizer.n_fft) // 2
        # Frames re-computed before the first new one, so that the window (and pre-emphasis,
        # which looks one sample back) of every new frame starts inside the audio kept.
        self.margin = math.ceil((self.half_window + 1) / self.hop) + 1
        self._audio = np.zeros(0, dtype=np.float32)
        self._origin = 0  # utterance sample index of _audio[0]
        self._total = 0  # samples of the utterance so far
        self.frames_out = 0  # mel frames emitted so far

    def push(self, samples: FloatAudio) -> torch.Tensor:
        """New frames whose windows lie inside the audio so far: [features, n]."""
        self._audio = np.concatenate([self._audio, samples])
        self._total += samples.size
        ready = (self._total - self.half_window) // self.hop + 1  # frames with whole windows
        return self._frames(max(ready, 0), final=False)

    def finish(self) -> torch.Tensor:
        """The remaining frames, with the preprocessor's end padding (as offline)."""
        frames = self._frames(self._total // self.hop, final=True)
        self._audio = np.zeros(0, dtype=np.float32)
        self._origin = self._total = self.frames_out = 0
        return frames

    def _frames(self, end: int, final: bool) -> torch.Tensor:
        first = self.frames_out
        if end <= first:
            return torch.zeros((self.preprocessor.featurizer.nfilt, 0), device=self.device)
        start_frame = max(0, first - self.margin)
        start = start_frame * self.hop
        segment = self._audio[start - self._origin :]
        signal = torch.from_numpy(np.ascontiguousarray(segment)).to(self.device)[None]
        length = torch.tensor([segment.size], device=self.device)
        with torch.inference_mode():
            features, _ = self.preprocessor(input_signal=signal, length=length)
        out: torch.Tensor = features[0, :, first - start_frame : end - start_frame]
        self.frames_out = end
        # Keep only what the next frames' windows (and their margin) reach back to.
        keep_from = max(0, (end - self.margin) * self.hop)
        if not final and keep_from > self._origin:
            self._audio = self._audio[keep_from - self._origin :]
            self._origin = keep_from
        return out


@dataclass
class Chunk:
    """One encoder step's input: mel frames with the pre-encode cache in front."""

    features: torch.Tensor  # [features, frames]
    length: int  # valid frames (the rest is padding)
    first: bool  # the utterance's first step (nothing to drop after pre-encoding)
    last: bool = False  # the utterance's last step (keep every output frame)
    offset: int = 0  # mel frames of the utterance before this chunk's new frames


class ChunkCursor:
    """Cuts a stream of mel frames into the chunks that `CacheAwareStreamingAudioBuffer` makes.

    Step 0 takes `chunk_size[0]` frames after `pre_encode_cache_size[0]` zero frames; later
    steps take `chunk_size[1]` frames after the last `pre_encode_cache_size[1]` frames seen. At
    the end a part-chunk is kept, not dropped as the buffer does, so that the last frames are
    decoded as the offline pass decodes them.
    """

    def __init__(self, streaming_cfg: Any, feat_in: int) -> None:
        def pair(value: Any) -> tuple[int, int]:
            return (value[0], value[1]) if isinstance(value, list | tuple) else (value, value)

        self.chunk_size = pair(streaming_cfg.chunk_size)
        self.shift_size = pair(streaming_cfg.shift_size)
        self.pre_cache = pair(streaming_cfg.pre_encode_cache_size)
        self.feat_in = feat_in
        self._pending: torch.Tensor | None = None  # frames not yet consumed (with the cache)
        self._cache_frames = 0  # how many of the pending frames are pre-encode cache
        self._consumed = 0  # new (not cache) frames of the utterance taken by earlier chunks
        self.steps = 0

    def push(self, frames: torch.Tensor) -> list[Chunk]:
        """Whole chunks completed by `frames`."""
        self._append(frames)
        return self._cut(final=False)

    def finish(self, frames: torch.Tensor) -> list[Chunk]:
        """Every remaining chunk, the last one possibly short; then ready for a new utterance."""
        self._append(frames)
        chunks = self._cut(final=True)
        self._pending, self._cache_frames, self.steps, self._consumed = None, 0, 0, 0
        return chunks

    def _append(self, frames: torch.Tensor) -> None:
        if self._pending is None:
            zeros = frames.new_zeros((self.feat_in, self.pre_cache[0]))
            self._pending, self._cache_frames = zeros, self.pre_cache[0]
        if frames.shape[-1]:
            self._pending = torch.cat([self._pending, frames], dim=-1)

    def _cut(self, final: bool) -> list[Chunk]:
        chunks: list[Chunk] = []
        assert self._pending is not None
        while True:
            index = 0 if self.steps == 0 else 1
            size, shift = self.chunk_size[index], self.shift_size[index]
            available = self._pending.shape[-1] - self._cache_frames
            if available < size and not (final and available > 0):
                return chunks
            take = min(size, available)
            width = self._cache_frames + take
            last = final and available <= shift
            chunks.append(
                Chunk(self._pending[:, :width], width, self.steps == 0, last, self._consumed)
            )
            self.steps += 1
            self._consumed += min(shift, available)
            # The next chunk starts `shift` frames on, after the last pre_cache[1] frames.
            consumed = self._cache_frames + min(shift, available)
            keep = min(self.pre_cache[1], consumed)
            self._pending = self._pending[:, consumed - keep :]
            if keep < self.pre_cache[1]:  # too early in the utterance: zeros, as the buffer does
                zeros = self._pending.new_zeros((self.feat_in, self.pre_cache[1] - keep))
                self._pending = torch.cat([zeros, self._pending], dim=-1)
            self._cache_frames = self.pre_cache[1]
            if final and available <= shift:
                return chunks

"""The Magpie backend's streaming decoder, and its contract with NeMo's MagpieTTSModel.

No Magpie checkpoint can be loaded here (the hub is unreachable and none ships on PyPI), and a
tiny Magpie cannot be built from config alone: MagpieTTSModel.__init__ restores its codec from a
.nemo file or the hub (`codecmodel_path`). So these tests check the chunked, crossfaded decoding
with codec test doubles, and that the real NeMo class still has the per-frame methods, with the
signatures, that the backend wraps.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

pytest.importorskip("nemo.collections.tts.models", reason="needs the nemo extra")

# NeMo and its dependencies warn at import (deprecations in lightning, megatron, pydub...).
pytestmark = [
    pytest.mark.nemo,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

from services.tts.backends.magpie import (  # noqa: E402  (after the importorskip)
    CONTEXT_FRAMES,
    FrameDecoder,
    MagpieTtsBackend,
)

SAMPLES_PER_FRAME = 1024  # 46.4 ms at 22.05 kHz


def context_free(frames: np.ndarray) -> np.ndarray:
    """A codec double whose audio for a frame depends on that frame only."""
    levels = frames[0].astype(np.float32) / 100
    return np.repeat(levels, SAMPLES_PER_FRAME)


def with_context(frames: np.ndarray) -> np.ndarray:
    """A codec double with a receptive field of one frame back (like a causal convolution)."""
    audio = context_free(frames)
    out = audio.copy()
    out[SAMPLES_PER_FRAME:] = 0.5 * (audio[SAMPLES_PER_FRAME:] + audio[:-SAMPLES_PER_FRAME])
    return out


def frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 100, size=8) for _ in range(count)]


def stream(decoder: FrameDecoder, sequence: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    chunks, first_at = [], -1
    for index, frame in enumerate(sequence):
        chunk = decoder.push(frame)
        if chunk is not None:
            chunks.append(chunk)
            first_at = index if first_at < 0 else first_at
    chunks.append(decoder.flush())
    return chunks, first_at


@pytest.mark.parametrize("codec", [context_free, with_context])
@pytest.mark.parametrize("count", [1, 3, 4, 5, 17, 40])
@pytest.mark.parametrize("chunk_frames", [2, 4, 7])
def test_streamed_audio_equals_the_whole_decode(codec, count, chunk_frames):
    sequence = frames(count)
    chunks, _ = stream(FrameDecoder(codec, chunk_frames), sequence)
    whole = codec(np.stack(sequence, axis=1))
    streamed = np.concatenate(chunks)
    assert streamed.size == whole.size == count * SAMPLES_PER_FRAME
    np.testing.assert_allclose(streamed, whole, atol=1e-6)


def test_first_audio_comes_after_chunk_frames_frames():
    chunks, first_at = stream(FrameDecoder(context_free, 4), frames(20))
    assert first_at == 3  # the fourth frame completes the first chunk
    assert chunks[0].size == 3 * SAMPLES_PER_FRAME  # one frame held back for the crossfade


def test_each_chunk_decodes_only_a_few_frames():
    seen: list[int] = []

    def counting(frames_: np.ndarray) -> np.ndarray:
        seen.append(frames_.shape[1])
        return context_free(frames_)

    stream(FrameDecoder(counting, 4), frames(40))
    assert max(seen) <= 4 + 1 + CONTEXT_FRAMES  # new frames, the held-back one, context


def test_seams_are_crossfaded_not_cut():
    # A codec that drifts at the right edge of each decode (it lacks the future frames there):
    # continuous within a decode, but each chunk's last frame disagrees with the next decode.
    def edgy(frames_: np.ndarray) -> np.ndarray:
        audio = context_free(frames_)
        audio[-SAMPLES_PER_FRAME:] += np.linspace(0, 0.5, SAMPLES_PER_FRAME, dtype=np.float32)
        return audio

    sequence = [np.full(8, 10) for _ in range(12)]
    streamed = np.concatenate(stream(FrameDecoder(edgy, 4), sequence)[0])
    assert np.abs(np.diff(streamed)).max() < 0.01  # no step at any seam


def test_the_backend_reports_voices_and_model_before_load():
    backend = MagpieTtsBackend("/models/magpie_tts_multilingual_357m.nemo", device="cpu")
    assert backend.model_name == "magpie_tts_multilingual_357m"
    assert [v.name for v in backend.voices] == ["john", "sofia", "aria", "jason", "leo"]
    assert backend.voices[0].languages == ("en", "es", "de", "fr", "vi", "it", "zh")


def test_nemo_magpie_still_has_the_frame_loop_the_backend_wraps():
    from nemo.collections.tts.models import MagpieTTSModel
    from nemo.collections.tts.parts.utils import tts_dataset_utils

    check = inspect.signature(MagpieTTSModel._check_eos_and_update_state)
    assert list(check.parameters)[1:3] == ["chunk_state", "audio_codes_next"]
    terminate = inspect.signature(MagpieTTSModel._should_terminate_loop)
    assert "chunk_state" in terminate.parameters
    generate = inspect.signature(MagpieTTSModel.generate_speech)
    for name in ("batch", "chunk_state", "end_of_text", "beginning_of_text", "use_cfg"):
        assert name in generate.parameters
    source = inspect.getsource(MagpieTTSModel.generate_speech)
    # Both are called once per frame inside the decoding loop, in this order.
    assert source.index("self._check_eos_and_update_state(") < source.index(
        "self._should_terminate_loop("
    )
    assert "output_sample_rate" in inspect.getsource(MagpieTTSModel.__init__)
    assert callable(tts_dataset_utils.chunk_text_for_inference)
    assert callable(tts_dataset_utils.get_tokenizer_for_language)

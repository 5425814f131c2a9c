"""The Magpie backend on the real NeMo classes: a tiny MagpieTTSModel with random weights, on CPU.

No Magpie checkpoint can be loaded here (the hub is unreachable and none ships on PyPI), but NeMo
builds both models from config alone: `MagpieTTSModel.__init__` restores its codec with
`AudioCodecModel.restore_from(cfg.codecmodel_path)` for any path not starting with "nvidia/", so
a tiny AudioCodecModel built from config and saved to a temporary .nemo serves as its codec. The
tiny Magpie is saved to a .nemo too and restored by the backend's own `load`. It speaks noise,
but through the same frame loop, codec and chunked decoding as the real model, so the tests
check STREAM and BATCH audio, the codec's true rate, and a cancel between frames. The chunked,
crossfaded decoding is also checked exactly with codec test doubles.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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

import torch  # noqa: E402  (after the importorskip)

from nemotron.speech.v1 import tts_pb2, tts_pb2_grpc  # noqa: E402
from services.runtime.errors import ResourceExhausted  # noqa: E402
from services.tts.backend import SynthesisJob, SynthesisMode  # noqa: E402
from services.tts.backends import magpie as magpie_module  # noqa: E402
from services.tts.backends.magpie import (  # noqa: E402
    CONTEXT_FRAMES,
    MIN_DECODE_FRAMES,
    FrameDecoder,
    MagpieTtsBackend,
)
from services.tts.servicer import TtsService  # noqa: E402
from services.tts.settings import TtsSettings  # noqa: E402
from services.tts.words import TimingSource  # noqa: E402
from tests.helpers import read_all, read_rest  # noqa: E402
from tests.servers import channel_to, running  # noqa: E402

Req = tts_pb2.SynthesizeRequest
BATCH = tts_pb2.SYNTHESIS_MODE_BATCH

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


def test_every_decode_has_the_frames_the_codec_needs():
    # The codec's first convolution pads 3 frames each side: fewer than 4 frames fail.
    def strict(frames_: np.ndarray) -> np.ndarray:
        assert frames_.shape[1] >= MIN_DECODE_FRAMES
        return context_free(frames_)

    for count in (4, 5, 8, 9, 24):
        chunks, _ = stream(FrameDecoder(strict, 4), frames(count))
        assert sum(c.size for c in chunks) == count * SAMPLES_PER_FRAME


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


# ---- a tiny MagpieTTSModel with random weights, restored by the backend -----------------------

TINY_STEPS = 24  # frames per text (max_decoder_steps); no end-of-audio is ever sampled
TINY_RATE = 22050
_MODULES = "nemo.collections.tts.modules.audio_codec_modules."
_LAYER = {
    "d_model": 32,
    "d_ffn": 64,
    "sa_n_heads": 1,
    "p_dropout": 0.0,
    "p_dropout_out": 0.0,
    "apply_norm_out": True,
    "max_length_causal_mask": 256,
    "use_learnable_pos_emb": True,
}


def build_tiny_magpie(directory: Path) -> Path:
    """A .nemo of a 1-layer Magpie (decoder_ce, five baked speakers) over a tiny 22.05 kHz codec."""
    from nemo.collections.tts.models import AudioCodecModel, MagpieTTSModel
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    codec = AudioCodecModel(
        cfg=OmegaConf.create(
            {
                "sample_rate": TINY_RATE,
                "samples_per_frame": SAMPLES_PER_FRAME,
                "commit_loss_scale": 0.0,
                "loss_resolutions": [[512, 128, 512]],
                "mel_loss_dims": [64],
                "audio_encoder": {
                    "_target_": _MODULES + "HiFiGANEncoder",
                    "down_sample_rates": [2, 2, 4, 8, 8],
                    "encoded_dim": 16,
                    "base_channels": 4,
                    "resblock_dilation_sizes": [1],
                },
                "audio_decoder": {
                    "_target_": _MODULES + "HiFiGANDecoder",
                    "up_sample_rates": [8, 8, 4, 2, 2],
                    "input_dim": 16,
                    "base_channels": 32,
                    "output_activation": "tanh",
                },
                "vector_quantizer": {  # 4 codebooks of 2016 codes, like the real codec's 8
                    "_target_": _MODULES + "GroupFiniteScalarQuantizer",
                    "num_groups": 4,
                    "num_levels_per_group": [8, 7, 6, 6],
                },
                "generator_loss": {
                    "_target_": "nemo.collections.tts.losses.audio_codec_loss.GeneratorSquaredLoss"
                },
                "discriminator_loss": {
                    "_target_": "nemo.collections.tts.losses.audio_codec_loss."
                    "DiscriminatorSquaredLoss"
                },
            }
        )
    )
    codec_path = directory / "tiny_codec.nemo"
    codec.save_to(str(codec_path))
    tokenizers = "nemo.collections.common.tokenizers.text_to_speech.tts_tokenizers."
    model = MagpieTTSModel(
        cfg=OmegaConf.create(
            {
                "model_type": "decoder_ce",
                "codecmodel_path": str(codec_path),
                "embedding_dim": 32,
                "prior_end_step": 0,
                "prior_scaledown_start_step": 0,
                "local_transformer_type": "autoregressive",
                "local_transformer_n_layers": 1,
                "local_transformer_hidden_dim": 32,
                "text_tokenizers": {
                    "english_phoneme": {
                        "_target_": tokenizers + "EnglishCharsTokenizer",
                        "punct": True,
                        "apostrophe": True,
                        "pad_with_space": False,
                    }
                },
                "encoder": {**_LAYER, "n_layers": 1, "kernel_size": 3, "is_causal": True},
                "context_encoder": {**_LAYER, "n_layers": 1, "kernel_size": 3, "is_causal": False},
                "decoder": {
                    **_LAYER,
                    "n_layers": 1,
                    "kernel_size": 1,
                    "is_causal": True,
                    "has_xattn": True,
                    "xa_d_memory": 32,
                    "xa_n_heads": 1,
                    "xa_d_head": 32,
                    "apply_norm_to_cond": True,
                },
                "inference_parameters": {"max_decoder_steps": TINY_STEPS, "topk": 10},
            }
        )
    )
    with torch.no_grad():
        # Random weights would end the audio at a random frame; forbid the special tokens
        # (end of audio and the rest) so every text gives exactly TINY_STEPS frames.
        tokens = model.num_all_tokens_per_codebook
        model.final_proj.bias.view(-1, tokens)[:, model.codebook_size :] = -1e4
        for projection in model.local_transformer_out_projections:
            projection.bias[model.codebook_size :] = -1e4
    # Baked speakers, as magpie_tts_multilingual_357m has (its context encoder is bypassed).
    speakers, frames, dim = 5, 3, 32
    model.baked_context_embedding = torch.nn.Embedding(speakers, frames * dim)
    model._baked_embedding_T = torch.tensor(frames)
    model._baked_embedding_D = torch.tensor(dim)
    model.baked_context_embedding_len = torch.full((speakers,), frames, dtype=torch.long)
    path = directory / "tiny_magpie.nemo"
    model.save_to(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_magpie(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_magpie(tmp_path_factory.mktemp("magpie"))


@pytest.fixture
async def magpie(tiny_magpie: Path) -> AsyncIterator[MagpieTtsBackend]:
    backend = MagpieTtsBackend(str(tiny_magpie), device="cpu", chunk_frames=4)
    await backend.load()
    try:
        yield backend
    finally:
        await backend.aclose()


def job(
    backend: MagpieTtsBackend, mode: SynthesisMode, words: str = "Hello there."
) -> SynthesisJob:
    return SynthesisJob(words, backend.voices[1], "en", mode)


def count_frames(backend: MagpieTtsBackend, at: int = 0) -> tuple[list[int], threading.Event]:
    """Count the frame loop's steps; the event is set once `at` steps were taken."""
    model = backend._model
    terminate = model._should_terminate_loop  # the backend's wrapper
    steps = [0]
    reached = threading.Event()

    def counting(*args: Any, **kwargs: Any) -> bool:
        steps[0] += 1
        if steps[0] >= at:
            reached.set()
        return bool(terminate(*args, **kwargs))

    model._should_terminate_loop = counting
    return steps, reached


async def gpu_idle(backend: MagpieTtsBackend) -> None:
    """Wait until the backend's generation thread has finished what it was doing."""
    await asyncio.get_running_loop().run_in_executor(backend._gpu, lambda: None)


async def test_tiny_magpie_reports_baked_voices_at_the_codec_rate(magpie):
    assert magpie.model_name == "tiny_magpie"
    assert [v.name for v in magpie.voices] == ["john", "sofia", "aria", "jason", "leo"]
    codec_rate = magpie._model._codec_model.output_sample_rate
    assert {v.sample_rate_hz for v in magpie.voices} == {codec_rate} == {TINY_RATE}


async def test_tiny_magpie_stream_mode_sends_audio_every_few_frames(magpie):
    chunks = [c async for c in magpie.synthesize(job(magpie, SynthesisMode.STREAM))]
    sizes = [c.audio.size for c in chunks]
    # First chunk after 4 frames, one held back for the crossfade; then 4 frames per chunk.
    assert sizes[0] == 3 * SAMPLES_PER_FRAME
    assert all(size == 4 * SAMPLES_PER_FRAME for size in sizes[1:-1])
    assert sum(sizes) == TINY_STEPS * SAMPLES_PER_FRAME
    audio = np.concatenate([c.audio for c in chunks])
    assert audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0


async def test_tiny_magpie_batch_mode_sends_the_segment_in_one_piece(magpie):
    chunks = [c async for c in magpie.synthesize(job(magpie, SynthesisMode.BATCH))]
    assert [c.audio.size for c in chunks] == [TINY_STEPS * SAMPLES_PER_FRAME]
    empty = [c async for c in magpie.synthesize(job(magpie, SynthesisMode.BATCH, " "))]
    assert empty == []


async def test_tiny_magpie_closing_a_stream_stops_generation_at_the_next_frame(magpie):
    magpie._model.inference_parameters.max_decoder_steps = 400
    steps, _ = count_frames(magpie)
    generator = magpie.synthesize(job(magpie, SynthesisMode.STREAM))
    assert (await anext(generator)).audio.size > 0
    await generator.aclose()
    at_close = steps[0]
    await gpu_idle(magpie)
    assert steps[0] - at_close <= 1  # the frame in progress, then the loop ends
    assert steps[0] < 400


async def test_tiny_magpie_cancelling_a_batch_stops_generation_between_frames(magpie):
    magpie._model.inference_parameters.max_decoder_steps = 400
    steps, reached = count_frames(magpie, at=6)

    async def whole() -> list[np.ndarray]:
        return [c async for c in magpie.synthesize(job(magpie, SynthesisMode.BATCH))]

    task = asyncio.create_task(whole())
    assert await asyncio.to_thread(reached.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    at_cancel = steps[0]
    await gpu_idle(magpie)
    assert steps[0] - at_cancel <= 1
    assert steps[0] < 400
    # The next synthesis starts clean.
    magpie._model.inference_parameters.max_decoder_steps = TINY_STEPS
    chunks = [c async for c in magpie.synthesize(job(magpie, SynthesisMode.BATCH))]
    assert sum(c.audio.size for c in chunks) == TINY_STEPS * SAMPLES_PER_FRAME


@pytest.mark.parametrize("mode", [SynthesisMode.STREAM, SynthesisMode.BATCH])
async def test_tiny_magpie_a_failing_generation_raises_instead_of_hanging(magpie, mode):
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("generation failed")

    magpie._model.generate_speech = broken
    with pytest.raises(RuntimeError, match="generation failed"):
        async for _ in magpie.synthesize(job(magpie, mode)):
            pass


async def test_tiny_magpie_very_short_audio_is_decoded(magpie):
    audio = await asyncio.get_running_loop().run_in_executor(
        magpie._gpu, magpie._decode, np.zeros((4, 2), dtype=np.int64)
    )
    assert audio.size == 2 * SAMPLES_PER_FRAME


async def test_tiny_magpie_over_grpc_with_ids_rates_and_cancel(tiny_magpie):
    settings = TtsSettings(
        port=0, backend="magpie", model=str(tiny_magpie), device="cpu", shutdown_grace_s=0.5
    )
    async with running(TtsService(settings, MagpieTtsBackend.from_settings(settings))) as server:
        async with channel_to(server) as channel:
            stub = tts_pb2_grpc.TtsServiceStub(channel)
            voices = (await stub.ListVoices(tts_pb2.ListVoicesRequest(language="de"))).voices
            assert [(v.name, v.sample_rate_hz, v.backend, v.is_default) for v in voices[:1]] == [
                ("john", TINY_RATE, "magpie", True)
            ]
            assert len(voices) == 5
            requests = [
                Req(config=tts_pb2.SynthesisConfig(voice="aria", language="de", sample_rate_hz=0)),
                Req(text=tts_pb2.TextSegment(segment_id="a", text="Guten Tag.")),
                Req(text=tts_pb2.TextSegment(segment_id="b", text="Hallo.", mode=BATCH)),
                Req(close=tts_pb2.CloseStream()),
            ]
            responses = await read_all(stub.Synthesize(iter(requests)))
            created = responses[0].stream_created
            assert (created.sample_rate_hz, created.voice, created.language) == (
                TINY_RATE,
                "aria",
                "de",
            )
            assert (created.backend, created.model) == ("magpie", "tiny_magpie")
            audio = [r.audio for r in responses if r.HasField("audio")]
            assert {a.stream_id for a in audio} == {created.stream_id}
            assert [a.segment_id for a in audio][-1] == "b"
            done = [r.segment_complete for r in responses if r.HasField("segment_complete")]
            seconds = TINY_STEPS * SAMPLES_PER_FRAME / TINY_RATE
            assert [(c.segment_id, c.audio_ms) for c in done] == [
                ("a", pytest.approx(1000 * seconds)),
                ("b", pytest.approx(1000 * seconds)),
            ]

            server.service.backend._model.inference_parameters.max_decoder_steps = 400
            call = stub.Synthesize()
            await call.write(Req(config=tts_pb2.SynthesisConfig(sample_rate_hz=16000)))
            await call.write(Req(text=tts_pb2.TextSegment(segment_id="long", text="Long.")))
            old = (await call.read()).stream_created
            assert old.sample_rate_hz == 16000
            assert (await call.read()).WhichOneof("response") == "audio"
            await call.write(Req(cancel=tts_pb2.CancelStream()))
            while (response := await call.read()).WhichOneof("response") != "cancelled":
                assert response.WhichOneof("response") == "audio"
            assert (response.cancelled.stream_id, response.cancelled.dropped_segments) == (
                old.stream_id,
                1,
            )
            server.service.backend._model.inference_parameters.max_decoder_steps = TINY_STEPS
            await call.write(Req(text=tts_pb2.TextSegment(segment_id="next", text="Next.")))
            await call.done_writing()
            rest = await read_rest(call)
            assert rest[0].stream_created.stream_id != old.stream_id
            assert {r.audio.stream_id for r in rest if r.HasField("audio")} == {
                rest[0].stream_created.stream_id
            }
            complete = next(r.segment_complete for r in rest if r.HasField("segment_complete"))
            assert complete.audio_ms == pytest.approx(1000 * seconds, abs=1)
            assert rest[-1].WhichOneof("response") == "done"


async def test_tiny_magpie_a_reader_that_falls_behind_holds_generation_back_and_loses_nothing(
    magpie, monkeypatch
):
    monkeypatch.setattr(magpie_module, "AUDIO_QUEUE_CHUNKS", 1)
    steps, finished = count_frames(magpie, at=TINY_STEPS)
    generator = magpie.synthesize(job(magpie, SynthesisMode.STREAM))
    chunks = [await anext(generator)]
    # Unbounded, the GPU thread would run on to the end; held back, it waits for the reader
    # (a chunk queued, one waiting for room: about 12 of the 24 frames).
    assert not await asyncio.to_thread(finished.wait, 1.0)
    assert steps[0] < TINY_STEPS
    chunks += [chunk async for chunk in generator]
    assert sum(chunk.audio.size for chunk in chunks) == TINY_STEPS * SAMPLES_PER_FRAME


async def test_tiny_magpie_closing_a_stream_whose_queue_is_full_frees_the_gpu_thread(
    magpie, monkeypatch
):
    monkeypatch.setattr(magpie_module, "AUDIO_QUEUE_CHUNKS", 1)
    magpie._model.inference_parameters.max_decoder_steps = 400
    steps, far = count_frames(magpie, at=40)
    generator = magpie.synthesize(job(magpie, SynthesisMode.STREAM))
    assert (await anext(generator)).audio.size > 0
    assert not await asyncio.to_thread(far.wait, 1.0), "the GPU thread waits for the reader"
    await generator.aclose()
    await asyncio.wait_for(gpu_idle(magpie), 10)  # no deadlock: the waiting put gave up
    assert steps[0] < 40
    magpie._model.inference_parameters.max_decoder_steps = TINY_STEPS
    chunks = [c async for c in magpie.synthesize(job(magpie, SynthesisMode.STREAM))]
    assert sum(c.audio.size for c in chunks) == TINY_STEPS * SAMPLES_PER_FRAME


async def test_tiny_magpie_a_reader_that_stops_reading_loses_its_stream_not_the_gpu_thread(
    magpie, monkeypatch
):
    monkeypatch.setattr(magpie_module, "AUDIO_QUEUE_CHUNKS", 1)
    monkeypatch.setattr(magpie_module, "READER_STALL_S", 0.3)
    magpie._model.inference_parameters.max_decoder_steps = 400
    steps, _far = count_frames(magpie, at=40)
    stalled = magpie.synthesize(job(magpie, SynthesisMode.STREAM))
    assert (await anext(stalled)).audio.size > 0
    # The reader stops; after READER_STALL_S the GPU thread gives its synthesis up and is free.
    await asyncio.wait_for(gpu_idle(magpie), 10)
    assert steps[0] < 40
    magpie._model.inference_parameters.max_decoder_steps = TINY_STEPS
    chunks = [c async for c in magpie.synthesize(job(magpie, SynthesisMode.STREAM))]
    assert sum(c.audio.size for c in chunks) == TINY_STEPS * SAMPLES_PER_FRAME
    # The stalled stream, when it reads again, learns why it ended.
    with pytest.raises(ResourceExhausted, match="stopped"):
        async for _chunk in stalled:
            pass


@pytest.mark.parametrize("mode", [SynthesisMode.STREAM, SynthesisMode.BATCH])
async def test_tiny_magpie_estimates_each_word_once_inside_its_audio(magpie, mode):
    words = "Well, I think we should leave before it rains."
    chunks = [c async for c in magpie.synthesize(job(magpie, mode, words))]
    times = [t for c in chunks for t in c.words]
    assert [t.index for t in times] == list(range(len(words.split())))
    assert {c.source for c in chunks} == {TimingSource.ESTIMATED}
    for chunk in chunks:
        chunk_ms = 1000 * chunk.audio.size / TINY_RATE
        assert all(0 <= t.start_ms < chunk_ms for t in chunk.words)
        assert all(t.end_ms >= t.start_ms for t in chunk.words)

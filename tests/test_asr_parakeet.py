"""The NeMo cache-aware streaming backend, on the CPU, with a tiny FastConformer-RNNT.

The model is built from a config with random weights (no download). What is checked: our
incremental features equal the offline preprocessor's; our streaming path (incremental features,
chunking, per-stream caches, batching) gives exactly the tokens of the model's own offline pass
(one encoder forward over the whole utterance plus the finalize padding, with the same attention
context) for every right context, alone and batched with other streams; and the tokens of NeMo's
own cache-aware streaming loop. The labels are single characters, so equal text is equal tokens.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc
from services.asr.backend import (
    AudioEvent,
    FinalizeEvent,
    FinalizeKind,
    Hypothesis,
    RecognizerEvent,
    StreamOptions,
    silence,
)
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.runtime.audio import float_to_pcm16
from services.runtime.errors import Unavailable
from services.runtime.streams import StreamQueue
from tests.asr_messages import check_words
from tests.helpers import frames, read_all
from tests.servers import channel_to, running

pytest.importorskip("nemo.collections.asr")

import torch
from omegaconf import OmegaConf

from services.asr.backends import parakeet_batcher
from services.asr.backends.parakeet import (
    ParakeetAsrBackend,
    cuda_graphs_wanted,
    greedy_decoding,
)
from services.asr.backends.parakeet_batcher import Step, StepBatcher
from services.asr.backends.parakeet_config import streaming_rnnt_config
from services.asr.backends.parakeet_stream import Chunk, IncrementalFeatures

pytestmark = [
    pytest.mark.nemo,
    pytest.mark.slow,
    # NeMo and its dependencies warn on import and on model construction (deprecations in
    # lightning, megatron and numba, "CUDA is not available"); none concerns our code.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

LABELS = list(" abcdefghijklmnopqrstuvwxyz'")
CONTEXTS = [[70, 0], [70, 1], [70, 6], [70, 13]]


def tiny_model_config() -> dict[str, Any]:
    """A 2-layer cache-aware FastConformer-RNNT with the real model's streaming layout."""
    return streaming_rnnt_config(
        labels=LABELS,
        hidden=32,
        layers=2,
        heads=2,
        ff_expansion=2,
        subsampling_channels=16,
        pred_hidden=32,
        pred_layers=1,
        att_contexts=CONTEXTS,
        max_symbols=3,
    )


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    from nemo.collections.asr.models import EncDecRNNTModel

    torch.manual_seed(0)
    model = EncDecRNNTModel(cfg=OmegaConf.create(tiny_model_config()))
    # Random weights emit mostly blanks; lift the joint's non-blank outputs so that the
    # comparisons below are over real token sequences.
    with torch.no_grad():
        model.joint.joint_net[-1].bias[:-1] += 3.0
    return model.eval()


def audio_of(seed: int, seconds: float, right_context: int = 1) -> np.ndarray:
    """Speech-like test audio: noise bursts with pauses (the tokens depend on every sample).

    Its length is rounded so that, with the finalize padding, it fills whole chunks: NeMo's
    reference loop drops a trailing part-chunk, which ours decodes (as the offline pass does).
    """
    first, size = 1 + 8 * right_context, 8 * (right_context + 1)  # mel frames per chunk
    chunks = max(1, round((seconds * 100 - first) / size))
    n = 160 * (first + size * chunks) - 1280 * (right_context + 1)
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0, 1, size=n // 1600 + 1) > 0.3, 1600)[:n]
    samples = 0.2 * rng.standard_normal(n) * envelope
    return (np.round(samples * 32768) / 32768).astype(np.float32)  # exact as LINEAR16


def reference_text(model: Any, audio: np.ndarray, right_context: int) -> str:
    """NeMo's own cache-aware streaming loop over `audio` plus the finalize padding.

    This is the loop of NeMo's speech_to_text_cache_aware_streaming_infer example: the offline
    preprocessor over the whole utterance, CacheAwareStreamingAudioBuffer, conformer_stream_step.
    """
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    model.encoder.set_default_att_context_size([70, right_context])
    padded = np.concatenate([audio, silence(0.08 * (right_context + 1), 16000)])
    with torch.inference_mode():
        signal = torch.from_numpy(padded)[None]
        features, length = model.preprocessor(
            input_signal=signal, length=torch.tensor([padded.size])
        )
        buffer = CacheAwareStreamingAudioBuffer(model=model, online_normalization=False)
        buffer.append_processed_signal(features[:, :, : int(length[0])])
        channel, time, channel_len = model.encoder.get_initial_cache_state(batch_size=1)
        hypotheses = None
        for step, (chunk, chunk_len) in enumerate(iter(buffer)):
            result = model.conformer_stream_step(
                processed_signal=chunk,
                processed_signal_length=chunk_len,
                cache_last_channel=channel,
                cache_last_time=time,
                cache_last_channel_len=channel_len,
                keep_all_outputs=buffer.is_buffer_empty(),
                previous_hypotheses=hypotheses,
                drop_extra_pre_encoded=0 if step == 0 else None,
                return_transcription=True,
            )
            _, hypotheses, channel, time, channel_len, _ = result[:6]
    return str(hypotheses[0].text)


def offline_text(model: Any, audio: np.ndarray, right_context: int) -> str:
    """The model's own offline pass: one encoder forward over `audio` plus the finalize padding."""
    model.encoder.set_default_att_context_size([70, right_context])
    padded = np.concatenate([audio, silence(0.08 * (right_context + 1), 16000)])
    with torch.inference_mode():
        features, length = model.preprocessor(
            input_signal=torch.from_numpy(padded)[None], length=torch.tensor([padded.size])
        )
        encoded, encoded_length = model.encoder(audio_signal=features, length=length)
        hypotheses = model.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=encoded, encoded_lengths=encoded_length, return_hypotheses=True
        )
    hypothesis = hypotheses[0]
    return str(hypothesis.text)


async def loaded(model: Any, right_context: int) -> ParakeetAsrBackend:
    backend = ParakeetAsrBackend(
        "tiny.nemo", right_context=right_context, device="cpu", asr_model=model
    )
    await backend.load()
    return backend


async def recognize(
    backend: ParakeetAsrBackend, audio: np.ndarray, piece: int, soft_at: int | None = None
) -> list[Hypothesis]:
    """Feed `audio` in pieces of `piece` samples, then a hard finalize; the answers."""
    events: StreamQueue[RecognizerEvent] = StreamQueue(8)

    async def feed() -> None:
        for index, start in enumerate(range(0, audio.size, piece)):
            await events.put(AudioEvent(audio[start : start + piece]))
            if index == soft_at:
                await events.put(FinalizeEvent("soft", FinalizeKind.SOFT))
        await events.put(FinalizeEvent("end", FinalizeKind.FINALIZE))
        events.close()

    feeder = asyncio.create_task(feed())
    answers = [
        h async for h in backend.recognize(StreamOptions("s", "en", False), events) if h.answers
    ]
    await feeder
    return answers


def test_incremental_features_equal_the_offline_features(tiny_model):
    audio = audio_of(1, 1.37)
    features = IncrementalFeatures(tiny_model.preprocessor, torch.device("cpu"))
    pieces = [features.push(audio[i : i + 333]) for i in range(0, audio.size, 333)]
    pieces.append(features.finish())
    streamed = torch.cat(pieces, dim=-1)
    with torch.inference_mode():
        offline, length = tiny_model.preprocessor(
            input_signal=torch.from_numpy(audio)[None], length=torch.tensor([audio.size])
        )
    assert streamed.shape[-1] == int(length[0])
    torch.testing.assert_close(streamed, offline[0, :, : int(length[0])], rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("right_context", [0, 1, 6, 13])
async def test_streaming_gives_the_tokens_of_the_offline_pass(tiny_model, right_context):
    backend = await loaded(tiny_model, right_context)
    try:
        # Lengths that do not fill whole chunks, fed in pieces that do not match the chunks.
        for seed, seconds, trim, piece in (
            (11, 0.4, 37, 123),
            (12, 1.7, 0, 320),
            (13, 3.1, 911, 777),
        ):
            audio = audio_of(seed, seconds, right_context)
            audio = audio[: audio.size - trim]
            expected = offline_text(tiny_model, audio, right_context)
            assert len(expected) > 5, "the tiny model should emit tokens"
            (final,) = await recognize(backend, audio, piece=piece)
            assert final.text == expected, (seed, right_context)
    finally:
        await backend.aclose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("right_context", [0, 1, 6, 13])
async def test_streaming_gives_the_tokens_of_nemos_own_streaming_loop(tiny_model, right_context):
    backend = await loaded(tiny_model, right_context)
    try:
        audio = audio_of(2, 2.3)
        expected = reference_text(tiny_model, audio, right_context)
        assert len(expected) > 5, "the tiny model should emit tokens"
        (final,) = await recognize(backend, audio, piece=320)
        assert final.text == expected
    finally:
        await backend.aclose()


@pytest.mark.timeout(120)
async def test_concurrent_streams_are_batched_and_each_gets_its_own_tokens(tiny_model):
    backend = await loaded(tiny_model, 1)
    try:
        clips = [audio_of(seed, 1.0 + 0.4 * seed) for seed in range(3, 7)]
        alone = [(await recognize(backend, clip, piece=320))[0].text for clip in clips]
        batches: list[int] = []
        assert backend._batcher is not None
        forward = backend._batcher.forward

        def counting(group: list[Any]) -> None:
            batches.append(len(group))
            forward(group)

        backend._batcher.forward = counting
        together = await asyncio.gather(*(recognize(backend, clip, piece=320) for clip in clips))
        assert [answers[0].text for answers in together] == alone
        assert alone == [reference_text(tiny_model, clip, 1) for clip in clips]
        assert alone == [offline_text(tiny_model, clip, 1) for clip in clips]
        assert max(batches) > 1, "steps of concurrent streams share forward passes"
    finally:
        await backend.aclose()


@pytest.mark.timeout(120)
async def test_soft_finalize_answers_the_current_hypothesis_and_the_utterance_goes_on(tiny_model):
    backend = await loaded(tiny_model, 1)
    try:
        audio = audio_of(8, 2.0)
        soft, hard = await recognize(backend, audio, piece=320, soft_at=50)
        assert (soft.answers and soft.answers.soft, hard.answers and hard.answers.soft) == (
            True,
            False,
        )
        assert hard.text == reference_text(tiny_model, audio, 1)
        assert hard.text.startswith(soft.text[: max(0, len(soft.text) - 3)])
    finally:
        await backend.aclose()


@pytest.fixture
async def nemo_stub(tiny_model) -> AsyncIterator[asr_pb2_grpc.AsrServiceStub]:
    settings = AsrSettings(port=0, backend="nemo", max_streams=4, shutdown_grace_s=0.5)
    backend = ParakeetAsrBackend("tiny.nemo", right_context=1, device="cpu", asr_model=tiny_model)
    async with running(AsrService(settings, backend)) as server, channel_to(server) as channel:
        yield asr_pb2_grpc.AsrServiceStub(channel)


@pytest.mark.timeout(120)
async def test_over_grpc_each_finalize_gets_the_reference_text(tiny_model, nemo_stub):
    Req = asr_pb2.StreamingRecognizeRequest
    first, second = audio_of(9, 1.5), audio_of(10, 1.1)
    requests = [Req(config=asr_pb2.RecognitionConfig(sample_rate_hz=16000))]
    for uid, clip in (("u1", first), ("u2", second)):
        requests += [Req(audio=c) for c in frames(float_to_pcm16(clip))]
        requests.append(Req(finalize=asr_pb2.Finalize(utterance_id=uid)))
    responses = await read_all(nemo_stub.StreamingRecognize(iter(requests)))
    assert responses[0].ready.backend == "nemo"
    finals = [r.transcript for r in responses[1:] if r.transcript.is_final]
    assert [t.utterance_id for t in finals] == ["u1", "u2"]
    assert [t.text for t in finals] == [reference_text(tiny_model, a, 1) for a in (first, second)]


@pytest.mark.timeout(120)
async def test_features_are_computed_on_the_model_thread_not_the_event_loop(
    tiny_model, monkeypatch
):
    threads: set[str] = set()
    for name in ("push", "finish"):
        method = getattr(IncrementalFeatures, name)

        def recording(self: Any, *args: Any, _method: Any = method) -> Any:
            threads.add(threading.current_thread().name)
            return _method(self, *args)

        monkeypatch.setattr(IncrementalFeatures, name, recording)
    backend = await loaded(tiny_model, 1)
    try:
        audio = audio_of(14, 1.2)
        (final,) = await recognize(backend, audio, piece=320)
        assert final.text == offline_text(tiny_model, audio, 1)
    finally:
        await backend.aclose()
    assert threads and all(name.startswith("nemo") for name in threads), threads


class _BlockedForward:
    """A forward pass that holds the model thread until released; counts what it ran."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.groups: list[int] = []

    def __call__(self, group: list[Step[list[int]]]) -> None:
        self.entered.set()
        assert self.release.wait(30)
        self.groups.append(len(group))
        for step in group:
            step.state.append(len(self.groups))


async def _blocked_batcher(
    monkeypatch: pytest.MonkeyPatch, streams: int
) -> tuple[StepBatcher[list[int]], _BlockedForward, list[list[int]], list[asyncio.Task[None]]]:
    """A batcher of 2 steps a pass, room for 2 queued, its first pass held: the queue fills."""
    monkeypatch.setattr(parakeet_batcher, "QUEUED_BATCHES", 1)
    forward = _BlockedForward()
    batcher = StepBatcher(forward, ThreadPoolExecutor(1), max_batch=2)
    batcher.start()
    states: list[list[int]] = [[] for _ in range(streams)]
    chunk = Chunk(torch.zeros((80, 9)), 9, first=False)
    tasks = [asyncio.create_task(batcher.step(state, chunk)) for state in states]
    assert await asyncio.to_thread(forward.entered.wait, 10)
    for _ in range(10):  # let every stream get as far as it can
        await asyncio.sleep(0)
    return batcher, forward, states, tasks


async def test_a_full_step_queue_holds_streams_back_without_dropping_steps(monkeypatch):
    batcher, forward, states, tasks = await _blocked_batcher(monkeypatch, streams=6)
    try:
        assert batcher._steps.full(), "two steps in the pass, two queued, two waiting for room"
        assert not any(task.done() for task in tasks)
        forward.release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert forward.groups == [2, 2, 2]
        assert all(len(state) == 1 for state in states), "every step ran exactly once"
    finally:
        forward.release.set()
        await batcher.aclose()
        batcher.executor.shutdown()


async def test_closing_the_batcher_fails_waiting_streams_instead_of_hanging(monkeypatch):
    batcher, forward, _, tasks = await _blocked_batcher(monkeypatch, streams=6)
    try:
        await batcher.aclose()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert all(isinstance(result, Unavailable) for result in results), results
    finally:
        forward.release.set()
        batcher.executor.shutdown()


@pytest.mark.parametrize(
    ("setting", "capability", "graphs"),
    [
        ("auto", None, True),  # the CPU: NeMo's default decoder (it runs no graphs there)
        ("auto", (8, 9), True),  # Ada
        ("auto", (9, 0), True),  # Hopper
        ("auto", (10, 0), False),  # Blackwell B200
        ("auto", (12, 0), False),  # RTX 5090
        ("auto", (12, 1), False),  # DGX Spark
        ("on", (12, 1), True),
        ("off", (9, 0), False),
        ("off", None, False),
    ],
)
def test_greedy_cuda_graphs_auto_is_off_on_blackwell_only(setting, capability, graphs):
    assert cuda_graphs_wanted(setting, capability) is graphs


def test_the_greedy_cuda_graphs_setting_reaches_the_backend():
    settings = AsrSettings(backend="nemo", greedy_cuda_graphs="off")
    assert ParakeetAsrBackend.from_settings(settings).greedy_cuda_graphs == "off"
    assert AsrSettings(backend="nemo").greedy_cuda_graphs == "auto"
    with pytest.raises(ValueError, match="greedy_cuda_graphs"):
        AsrSettings(backend="nemo", greedy_cuda_graphs="maybe")


def greedy_config(model: Any) -> tuple[str, bool, bool]:
    decoding = model.cfg.decoding
    return (
        str(decoding.strategy),
        bool(decoding.greedy.loop_labels),
        bool(decoding.greedy.use_cuda_graph_decoder),
    )


@pytest.mark.timeout(120)
async def test_without_cuda_graphs_the_decoder_is_the_seeds_and_streams_the_same_tokens(tiny_model):
    from nemo.collections.asr.parts.submodules.rnnt_greedy_decoding import (
        GreedyBatchedRNNTInfer,
        GreedyRNNTInfer,
    )

    clips = [audio_of(seed, 1.0 + 0.3 * seed) for seed in range(15, 18)]
    backend = await loaded(tiny_model, 1)  # "auto" on the CPU: NeMo's default decoder
    try:
        assert greedy_config(tiny_model) == ("greedy_batch", True, True)
        inner = tiny_model.decoding.decoding
        assert isinstance(inner, GreedyBatchedRNNTInfer)
        assert (inner.loop_labels, inner.use_cuda_graph_decoder) == (True, True)
        expected = [(await recognize(backend, clip, piece=320))[0].text for clip in clips]
    finally:
        await backend.aclose()
    assert all(len(text) > 5 for text in expected), "the tiny model should emit tokens"

    backend = ParakeetAsrBackend(
        "tiny.nemo", right_context=1, device="cpu", greedy_cuda_graphs="off", asr_model=tiny_model
    )
    await backend.load()
    try:
        assert greedy_config(tiny_model) == ("greedy", False, False)
        assert isinstance(tiny_model.decoding.decoding, GreedyRNNTInfer)
        alone = [(await recognize(backend, clip, piece=320))[0].text for clip in clips]
        assert alone == expected
        assert backend._batcher is not None
        batches: list[int] = []
        forward = backend._batcher.forward

        def counting(group: list[Any]) -> None:
            batches.append(len(group))
            forward(group)

        backend._batcher.forward = counting
        together = await asyncio.gather(*(recognize(backend, c, piece=320) for c in clips))
        assert [answers[0].text for answers in together] == expected
        assert max(batches) > 1, "the per-stream decoder also decodes batched steps"
    finally:
        await backend.aclose()
        tiny_model.change_decoding_strategy(greedy_decoding(tiny_model.cfg.decoding, True))


# ---- word times -------------------------------------------------------------------------------


def offline_token_frames(model: Any, audio: np.ndarray, right_context: int) -> list[int]:
    """The encoder frame of each token in the model's own offline pass."""
    model.encoder.set_default_att_context_size([70, right_context])
    padded = np.concatenate([audio, silence(0.08 * (right_context + 1), 16000)])
    with torch.inference_mode():
        features, length = model.preprocessor(
            input_signal=torch.from_numpy(padded)[None], length=torch.tensor([padded.size])
        )
        encoded, encoded_length = model.encoder(audio_signal=features, length=length)
        (hypothesis,) = model.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=encoded, encoded_lengths=encoded_length, return_hypotheses=True
        )
    return [int(t) for t in hypothesis.timestamp]


async def recognize_words(
    backend: ParakeetAsrBackend, audio: np.ndarray, piece: int
) -> list[Hypothesis]:
    events: StreamQueue[RecognizerEvent] = StreamQueue(8)

    async def feed() -> None:
        for start in range(0, audio.size, piece):
            await events.put(AudioEvent(audio[start : start + piece]))
        await events.put(FinalizeEvent("end", FinalizeKind.FINALIZE))
        events.close()

    feeder = asyncio.create_task(feed())
    options = StreamOptions("s", "en", True, word_timestamps=True)
    hypotheses = [h async for h in backend.recognize(options, events)]
    await feeder
    return hypotheses


@pytest.mark.timeout(120)
@pytest.mark.parametrize("right_context", [0, 1, 6])
async def test_streamed_token_frames_are_the_offline_pass_frames(tiny_model, right_context):
    backend = await loaded(tiny_model, right_context)
    try:
        audio = audio_of(21, 2.6, right_context)
        hypotheses = await recognize_words(backend, audio, piece=320)
        final = hypotheses[-1]
        assert final.answers is not None and final.text
        expected = offline_token_frames(tiny_model, audio, right_context)
        pieces = tiny_model.decoding.decode_ids_to_tokens(
            [LABELS.index(c) for c in final.text]  # the labels are the characters
        )
        # The words' first and last tokens sit at the frames the offline pass gave them.
        starts, index = [], 0
        for piece in pieces:
            if piece != " " and (index == 0 or pieces[index - 1] == " "):
                starts.append(expected[index])
            index += 1
        assert [w.start_ms for w in final.words] == pytest.approx(
            [min(80.0 * frame, final.audio_ms) for frame in starts]
        )
        assert " ".join(w.text for w in final.words) == final.text
        for hypothesis in hypotheses:
            assert " ".join(w.text for w in hypothesis.words) == hypothesis.text
            times = [(w.start_ms, w.end_ms) for w in hypothesis.words]
            assert all(0 <= start <= end <= hypothesis.audio_ms for start, end in times)
            assert [s for s, _ in times] == sorted(s for s, _ in times)
            assert all(w.confidence == 1.0 for w in hypothesis.words)
    finally:
        await backend.aclose()


@pytest.mark.timeout(120)
async def test_over_grpc_words_lie_inside_each_utterance(tiny_model, nemo_stub):
    Req = asr_pb2.StreamingRecognizeRequest
    config = asr_pb2.RecognitionConfig(
        sample_rate_hz=16000, interim_results=True, word_timestamps=True
    )
    requests = [Req(config=config)]
    for uid, clip in (("u1", audio_of(22, 1.5)), ("u2", audio_of(23, 1.2))):
        requests += [Req(audio=c) for c in frames(float_to_pcm16(clip))]
        requests.append(Req(finalize=asr_pb2.Finalize(utterance_id=uid)))
    responses = await read_all(nemo_stub.StreamingRecognize(iter(requests)))
    results = [r.transcript for r in responses if r.HasField("transcript")]
    finals = [t for t in results if t.is_final]
    assert [t.utterance_id for t in finals] == ["u1", "u2"]
    assert all(t.words for t in finals)
    for transcript in results:
        check_words(transcript)
    assert finals[1].words[0].start_ms >= finals[0].audio_end_ms

"""NeMo cache-aware streaming FastConformer (Parakeet realtime) for the GPU: the `nemo` backend.

Each stream keeps its own encoder caches and RNNT hypothesis and steps through the audio one
chunk of (right_context + 1) encoder frames (80 ms each) at a time, via `conformer_stream_step`.
Unlike the usual loop, which re-runs the preprocessor over the whole utterance every step and
serialises streams behind one lock:

- features are computed incrementally (`IncrementalFeatures`), exactly as the offline pass
  computes them, and a stream keeps only what its next step needs (memory per utterance is
  bounded by the caches, one chunk and the hypothesis);
- one batcher (`StepBatcher`) gathers the ready chunks of all streams and runs them as one
  forward pass (streams at the same kind of step share a batch; their caches are stacked and
  split again);
- everything that touches torch (features, chunking, forward passes) runs on the model's one
  thread, never on the event loop.

At finalize the utterance is padded with (right_context + 1) shift frames of silence so that
its last words get their right context, flushed, and its text answered; a soft finalize answers
the current hypothesis at once.

Word times come from the RNNT decoder: each token is emitted at an encoder frame (80 ms), which
the greedy decoder records in the hypothesis' `timestamp` (per chunk; the stream adds the chunk's
place in the utterance). A word starts at its first token's frame and ends a frame after its last
one. An RNNT emits a token once it has heard it, so times run late by up to the lookahead. The
greedy decoder keeps no token probabilities, so a word's confidence is 1.0.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from services.asr.backend import (
    AsrBackend,
    AudioEvent,
    FinalizeEvent,
    FinalizeKind,
    Hypothesis,
    RecognizedWord,
    RecognizerEvent,
    StreamOptions,
    silence,
)
from services.asr.settings import AsrSettings, GreedyCudaGraphs
from services.runtime.streams import StreamQueue

# torch and NeMo come with the nemo extra; without it mypy finds neither (hence the ignores).
try:
    import torch  # type: ignore[import-not-found, unused-ignore]
    from nemo.collections.asr.models import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
        ASRModel,
    )
    from omegaconf import open_dict  # type: ignore[import-not-found, unused-ignore]
except ImportError as err:
    raise ImportError(
        "the nemo backend needs torch and NeMo: pip install 'nemotron-speech-mesh[nemo]'"
    ) from err

from services.asr.backends.parakeet_batcher import Step, StepBatcher
from services.asr.backends.parakeet_stream import Chunk, ChunkCursor, IncrementalFeatures
from services.runtime.audio import FloatAudio

log = logging.getLogger(__name__)

DEFAULT_MODEL = "nvidia/nemotron-speech-streaming-en-0.6b"
ENCODER_FRAME_S = 0.08

T = TypeVar("T")


@dataclass
class StreamState:
    """What one stream carries from step to step (its model state, on the model's device)."""

    cache_last_channel: torch.Tensor  # [layers, 1, cache, d_model]
    cache_last_time: torch.Tensor  # [layers, 1, d_model, kernel]
    cache_last_channel_len: torch.Tensor  # [1]
    hypothesis: Any = None  # NeMo's RNNT Hypothesis, carried into the next step
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    token_frames: list[int] = field(default_factory=list)  # encoder frame of each token


class ParakeetAsrBackend(AsrBackend):
    """A cache-aware streaming FastConformer-RNNT from a .nemo file (or a reachable hub)."""

    name = "nemo"
    word_timestamps = True

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        right_context: int = 1,
        device: str = "auto",
        max_batch: int = 16,
        greedy_cuda_graphs: GreedyCudaGraphs = "auto",
        asr_model: Any = None,
    ) -> None:
        self.model_ref = model or DEFAULT_MODEL
        self.right_context = right_context
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.max_batch = max_batch
        self.greedy_cuda_graphs = greedy_cuda_graphs
        self.model: Any = asr_model  # a loaded model may be handed in (tests build tiny ones)
        self._batcher: StepBatcher[StreamState] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_settings(cls, settings: AsrSettings) -> Self:
        """The model named by `settings.model` with `settings.right_context`."""
        return cls(
            settings.model,
            right_context=settings.right_context,
            device=settings.device,
            max_batch=settings.max_batch,
            greedy_cuda_graphs=settings.greedy_cuda_graphs,
        )

    @property
    def model_name(self) -> str:
        """E.g. "nemotron-speech-streaming-en-0.6b"."""
        name = Path(self.model_ref).name if self.model_ref.endswith(".nemo") else self.model_ref
        return name.removesuffix(".nemo").split("/")[-1]

    @property
    def lookahead_ms(self) -> float:
        """Right context the model waits for, in ms."""
        return 1000 * ENCODER_FRAME_S * self.right_context

    async def load(self) -> None:
        """Load (or adopt) the model, set its attention context, and warm it up."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nemo")
        await self._on_model_thread(self._prepare)
        self._batcher = StepBatcher(self._forward, self._executor, self.max_batch)
        self._batcher.start()
        events: StreamQueue[RecognizerEvent] = StreamQueue(2)
        await events.put(AudioEvent(silence(0.5, self.sample_rate_hz)))
        await events.put(FinalizeEvent("warm-up", FinalizeKind.FINALIZE))
        events.close()
        async for _ in self.recognize(StreamOptions("warm-up", "en", False), events):
            pass
        log.info(
            "%s loaded on %s, right context %d", self.model_name, self.device, self.right_context
        )

    async def aclose(self) -> None:
        """Stop the batcher and release the model."""
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.model = None

    def recognize(
        self, options: StreamOptions, events: StreamQueue[RecognizerEvent]
    ) -> AsyncGenerator[Hypothesis, None]:
        """Step through the stream's audio chunk by chunk, in batches shared with other streams."""
        return self._recognize(options, events)

    async def _recognize(
        self, options: StreamOptions, events: StreamQueue[RecognizerEvent]
    ) -> AsyncGenerator[Hypothesis, None]:
        features = IncrementalFeatures(self.model.preprocessor, self.device)
        cursor = self.new_cursor()
        state = await self._on_model_thread(self.new_state)
        samples = 0
        padding = silence(
            ENCODER_FRAME_S * (self.right_context + 1), self.sample_rate_hz
        )  # (right_context + 1) shift frames
        async for event in events:
            if isinstance(event, AudioEvent):
                samples += event.samples.size
                chunks = await self._on_model_thread(_push, features, cursor, event.samples)
                for chunk in chunks:
                    await self.step(state, chunk)
                if options.interim_results:
                    audio_ms = 1000 * samples / self.sample_rate_hz
                    yield Hypothesis(
                        state.text,
                        audio_ms,
                        stability=0.5,
                        words=self.words(state, audio_ms) if options.word_timestamps else (),
                    )
                continue
            assert isinstance(event, FinalizeEvent)
            audio_ms = 1000 * samples / self.sample_rate_hz
            if not event.soft:
                for chunk in await self._on_model_thread(_finish, features, cursor, padding):
                    await self.step(state, chunk)
            words = self.words(state, audio_ms) if options.word_timestamps else ()
            yield Hypothesis(state.text, audio_ms, answers=event, stability=0.5, words=words)
            if not event.soft:
                state = await self._on_model_thread(self.new_state)
                samples = 0

    def words(self, state: StreamState, audio_ms: float) -> tuple[RecognizedWord, ...]:
        """The words of the stream's text with the frames of their tokens (see module doc).

        Times are kept inside the utterance's `audio_ms` (the last encoder frame and the
        finalize padding reach past it).
        """
        pieces = [str(p) for p in self.model.decoding.decode_ids_to_tokens(state.tokens)]
        spans = word_frames(pieces, state.token_frames) or [(0, 0)]
        written = state.text.split()
        if len(spans) != len(written):  # a tokenizer whose pieces do not show the spaces
            spans = [spans[i * len(spans) // len(written)] for i in range(len(written))]
        frame_ms = 1000 * ENCODER_FRAME_S
        return tuple(
            RecognizedWord(
                word,
                min(frame_ms * first, audio_ms),
                min(frame_ms * (last + 1), audio_ms),
                1.0,
            )
            for word, (first, last) in zip(written, spans, strict=True)
        )

    def new_state(self) -> StreamState:
        """Fresh encoder caches for one utterance."""
        channel, time, channel_len = self.model.encoder.get_initial_cache_state(batch_size=1)
        return StreamState(channel, time, channel_len)

    def new_cursor(self) -> ChunkCursor:
        """The chunking of the model's streaming configuration."""
        encoder = self.model.encoder
        return ChunkCursor(encoder.streaming_cfg, encoder._feat_in)

    async def step(self, state: StreamState, chunk: Chunk) -> None:
        """Run one chunk of one stream (batched with other streams' chunks)."""
        assert self._batcher is not None, "load() first"
        await self._batcher.step(state, chunk)

    async def _on_model_thread(self, work: Callable[..., T], *args: Any) -> T:
        """Run blocking torch work on the model's thread (in turn with the forward passes)."""
        assert self._executor is not None, "load() first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    # ---- the forward pass ----------------------------------------------------------------

    def _forward(self, group: list[Step[StreamState]]) -> None:
        """Blocking: one conformer_stream_step over the group's chunks; updates their states."""
        model = self.model
        first = group[0].chunk.first
        with torch.inference_mode():
            signal = torch.stack([s.chunk.features for s in group]).to(self.device)
            lengths = torch.tensor([s.chunk.length for s in group], device=self.device)
            cache_channel = torch.cat([s.state.cache_last_channel for s in group], dim=1)
            cache_time = torch.cat([s.state.cache_last_time for s in group], dim=1)
            cache_len = torch.cat([s.state.cache_last_channel_len for s in group])
            previous = [s.state.hypothesis for s in group]
            result = model.conformer_stream_step(
                processed_signal=signal,
                processed_signal_length=lengths,
                cache_last_channel=cache_channel,
                cache_last_time=cache_time,
                cache_last_channel_len=cache_len,
                keep_all_outputs=group[0].chunk.last,
                previous_hypotheses=None if first else previous,
                drop_extra_pre_encoded=0 if first else None,
                return_transcription=True,
            )
        _, hypotheses, channel, time, channel_len, _ = result[:6]
        subsampling = int(getattr(model.encoder, "subsampling_factor", 8))
        for index, s in enumerate(group):
            s.state.cache_last_channel = channel[:, index : index + 1].clone()
            s.state.cache_last_time = time[:, index : index + 1].clone()
            s.state.cache_last_channel_len = channel_len[index : index + 1].clone()
            hypothesis = hypotheses[index]
            s.state.hypothesis = hypothesis
            tokens = _token_list(hypothesis.y_sequence)
            # The chunk's first encoder frame: causal subsampling puts mel frame f in ceil(f/k).
            base = -(-s.chunk.offset // subsampling)
            added = len(tokens) - len(s.state.tokens)
            stamps = _frames_of(hypothesis.timestamp)[-added:] if added > 0 else []
            stamps = [0] * (max(added, 0) - len(stamps)) + stamps
            s.state.token_frames = s.state.token_frames[: len(s.state.tokens)]
            s.state.token_frames += [base + t for t in stamps]
            s.state.tokens = tokens
            s.state.text = hypothesis.text if isinstance(hypothesis.text, str) else ""

    # ---- loading -------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self.model is None:
            self.model = _restore(self.model_ref, self.device)
        model = self.model
        model.eval()
        model.to(self.device)
        encoder = model.encoder
        contexts = [list(c) for c in getattr(encoder, "att_context_size_all", [])]
        chosen = next((c for c in contexts if c[1] == self.right_context), None)
        if chosen is None:
            raise ValueError(
                f"the model has no attention context with right context {self.right_context}; "
                f"it offers {contexts}"
            )
        encoder.set_default_att_context_size(chosen)
        featurizer = model.preprocessor.featurizer
        featurizer.dither = 0.0
        featurizer.pad_to = 0
        if getattr(featurizer, "normalize", None) not in (None, "NA", ""):
            log.warning("the model normalizes features per utterance; streaming will differ")
        capability = (
            torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
        )
        graphs = cuda_graphs_wanted(self.greedy_cuda_graphs, capability)
        model.change_decoding_strategy(greedy_decoding(model.cfg.decoding, graphs), verbose=False)
        log.info(
            "RNNT greedy decoding: %s (greedy_cuda_graphs=%s, compute capability %s)",
            "batched label looping, CUDA graphs" if graphs else "per stream, no CUDA graphs",
            self.greedy_cuda_graphs,
            "none" if capability is None else ".".join(map(str, capability)),
        )


def _push(features: IncrementalFeatures, cursor: ChunkCursor, samples: FloatAudio) -> list[Chunk]:
    """Blocking: the chunks that `samples` complete."""
    return cursor.push(features.push(samples))


def _finish(features: IncrementalFeatures, cursor: ChunkCursor, padding: FloatAudio) -> list[Chunk]:
    """Blocking: every remaining chunk of the utterance, after the finalize padding."""
    tail = torch.cat([features.push(padding), features.finish()], dim=-1)
    return cursor.finish(tail)


def _restore(ref: str, device: torch.device) -> Any:
    path = Path(ref).expanduser()
    if path.suffix == ".nemo":
        if not path.is_file():
            raise FileNotFoundError(f"no .nemo file at {path}")
        return ASRModel.restore_from(str(path), map_location=device)
    return ASRModel.from_pretrained(ref, map_location=device)


def cuda_graphs_wanted(setting: GreedyCudaGraphs, capability: tuple[int, int] | None) -> bool:
    """Whether the greedy decoder uses CUDA graphs: `setting`, with "auto" decided by the GPU.

    `capability` is the GPU's compute capability (None on the CPU, where NeMo runs no graphs
    anyway). Blackwell (10.x data centre, 11.x Thor, 12.x RTX 50 and DGX Spark) and anything newer
    gets none: the seed, built for Blackwell, switches the graph decoder off as "required for
    Blackwell", and a decoder that fails there fails every stream.
    """
    if setting != "auto":
        return setting == "on"
    return capability is None or capability[0] < 10


def greedy_decoding(decoding: Any, cuda_graphs: bool) -> Any:
    """A copy of the model's decoding config with the greedy decoder that `cuda_graphs` picks.

    With graphs: `greedy_batch` with `loop_labels` and `use_cuda_graph_decoder` (NeMo's
    defaults). Without: both off, as the seed sets them for Blackwell, and the strategy `greedy`
    (NeMo's per-stream decoder, as in the seed), because NeMo's batched frame-looping decoder
    (`greedy_batch` without label looping) cannot carry a hypothesis from one chunk to the next:
    it raises NotImplementedError on `partial_hypotheses`.
    """
    decoding = copy.deepcopy(decoding)
    with open_dict(decoding):
        decoding.strategy = "greedy_batch" if cuda_graphs else "greedy"
        if decoding.get("greedy") is None:
            decoding.greedy = {}
        decoding.greedy.loop_labels = cuda_graphs
        decoding.greedy.use_cuda_graph_decoder = cuda_graphs
    return decoding


def word_frames(pieces: list[str], frames: list[int]) -> list[tuple[int, int]]:
    """(first, last) encoder frame of each word, from the tokens' pieces and frames.

    A word starts at a piece that begins with SentencePiece's "▁" or a space, or follows a
    piece that is only a space (character vocabularies spell the space as a token).
    """
    spans: list[tuple[int, int]] = []
    after_space = True
    for piece, frame in zip(pieces, frames, strict=False):
        if not piece.replace("▁", " ").strip():
            after_space = True
            continue
        if after_space or piece[0] in " ▁" or not spans:
            spans.append((frame, frame))
        else:
            spans[-1] = (spans[-1][0], frame)
        after_space = False
    return spans


def _frames_of(timestamp: Any) -> list[int]:
    """The token frames of a hypothesis' `timestamp`, a list or a tensor.

    A dict is NeMo's post-processed form, which the streaming decode does not ask for.
    """
    if timestamp is None or isinstance(timestamp, dict):
        return []
    return _token_list(timestamp)


def _token_list(sequence: Any) -> list[int]:
    if isinstance(sequence, torch.Tensor):
        return [int(t) for t in sequence.tolist()]
    return [int(t) for t in sequence]

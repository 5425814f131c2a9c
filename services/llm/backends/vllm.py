"""vLLM in process (its async engine, `AsyncLLMEngine`, i.e. vLLM v1's `AsyncLLM`), GPU only.

Installed with `pip install 'nemotron-speech-mesh[vllm]'`; nothing of vLLM is imported until this
backend is chosen. vLLM batches concurrent requests continuously and caches prompt prefixes by
block (automatic prefix caching), so a conversation's next turn re-evaluates only its new tokens;
the cached count comes back as `RequestOutput.num_cached_tokens`. Cancel (closing the generator)
aborts the request in the engine, which frees its KV blocks at the next engine step.

Tools go to the model's chat template (`tools=`, with the conversation's calls and results in
OpenAI's form), and the model writes its calls into the text as Hermes-style
`<tool_call>{...}</tool_call>`, which `ToolCallSplitter` cuts out: the text before the first call
is the answer, the calls never reach the chunks. With tool choice REQUIRED or NAMED and reasoning
off, vLLM's structured outputs (`SamplingParams.structured_outputs`) constrain the whole answer to
the calls' JSON (an array of calls, or the named tool's arguments). With reasoning on they are
not constrained (the engine would constrain the reasoning too: no reasoning parser runs in
process), nor with AUTO; the servicer then checks each call against its schema.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
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
from services.llm.backends.openai_wire import template_messages
from services.llm.backends.pieces import piece_events, text_events
from services.llm.context import fit_to_window, generation_reserve
from services.llm.reasoning import CLOSE_TAG, OPEN_TAG, Reasoning, ThinkSplitter
from services.llm.settings import LlmSettings
from services.llm.tools import (
    CallText,
    Tool,
    ToolCall,
    ToolCallSplitter,
    ToolChoiceMode,
    call_from_json,
    new_call_id,
)
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


def call_schema(request: GenerationRequest) -> dict[str, Any] | None:
    """The JSON schema the whole answer must follow when the request demands calls, else None.

    NAMED: the named tool's arguments. REQUIRED: an array of one or more calls
    (`{"name": ..., "arguments": {...}}`). None with reasoning on: the constraint would apply
    to the reasoning too.
    """
    tools = request.offered_tools
    if request.reasoning.enabled or not tools:
        return None
    if request.tool_choice.mode is ToolChoiceMode.NAMED:
        return tools[0].parameters
    if request.tool_choice.mode is ToolChoiceMode.REQUIRED:
        return {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [_call_schema(tool) for tool in tools]},
        }
    return None


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [tool.name]},
            "arguments": tool.parameters,
        },
        "required": ["name", "arguments"],
    }


def _unreadable(text: str) -> ToolCall:
    # The client learns that the model tried to call and failed, rather than hearing the JSON.
    return ToolCall(
        new_call_id(), "", text, error="the model wrote a tool call that is not a call's JSON"
    )


class CallReader:
    """Takes the calls out of the answer text; other events pass through.

    Without tools the text is all answer. With tools it goes through `ToolCallSplitter`; when the
    calls were constrained (`call_schema`), the whole text is the calls' JSON, read at the end.
    Tokens whose text was a call are still yielded (as `TokenText("", n)`), so they count.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.constrained = call_schema(request) is not None
        mode = request.tool_choice.mode
        self.named = request.tool_choice.name if mode is ToolChoiceMode.NAMED else ""
        tagged = request.offered_tools and not self.constrained
        self.splitter = ToolCallSplitter() if tagged else None
        self._json: list[str] = []

    def read(self, event: GenerationEvent) -> list[GenerationEvent]:
        """Events for one backend event: answer text, a completed call's `ToolCall`, or as is."""
        if not isinstance(event, TokenText):
            return [event]
        if self.constrained:
            self._json.append(event.text)
            return [TokenText("", event.tokens)] if event.tokens else []
        if self.splitter is None:
            return [event]
        return self._split(self.splitter.push(event.text), event.tokens)

    def flush(self) -> list[GenerationEvent]:
        """At the end: held-back answer text, or the constrained calls."""
        if self.splitter is not None:
            return self._split(self.splitter.flush(), 0)
        if not self.constrained:
            return []
        text = "".join(self._json).strip()
        if self.named:
            return [ToolCall(new_call_id(), self.named, text)]
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return [_unreadable(text)]  # cut off by max_tokens
        items = value if isinstance(value, list) else [value]
        texts = [json.dumps(item, ensure_ascii=False) for item in items]
        return [call_from_json(text) or _unreadable(text) for text in texts]

    def _split(self, pieces: Sequence[CallText], tokens: int) -> list[GenerationEvent]:
        events: list[GenerationEvent] = []
        for piece in pieces:
            if piece.call:
                call = call_from_json(piece.text)
                events.append(call if call is not None else _unreadable(piece.text))
            else:
                events.append(TokenText(piece.text, tokens))
                tokens = 0
        if tokens:
            events.insert(0, TokenText("", tokens))
        return events


def _shut_down_built_engine(build: asyncio.Future[Any]) -> None:
    """Shut down an engine whose load was cancelled while it was being built."""
    if not build.cancelled() and build.exception() is None:
        build.result().shutdown()


@dataclass(frozen=True)
class VllmApi:
    """The parts of vLLM's API that `generate` uses, taken from vLLM at load."""

    sampling_params: Any  # vllm.SamplingParams
    structured_outputs_params: Any  # vllm.sampling_params.StructuredOutputsParams
    delta: Any  # vllm.sampling_params.RequestOutputKind.DELTA


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
        self._api: VllmApi | None = None
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
            from vllm.sampling_params import (  # type: ignore[import-not-found, unused-ignore]
                RequestOutputKind,
                StructuredOutputsParams,
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
            engine = await asyncio.shield(build)
        except asyncio.CancelledError:
            # The thread cannot be stopped: shut the engine down once it exists, not leak it.
            build.add_done_callback(_shut_down_built_engine)
            raise
        api = VllmApi(SamplingParams, StructuredOutputsParams, RequestOutputKind.DELTA)
        self.attach(engine, await engine.get_tokenizer(), api)
        warmup = GenerationRequest("warmup", (ChatTurn("user", "Hi"),), Sampling(max_tokens=2))
        async for _event in self.generate(warmup):
            pass

    def attach(self, engine: Any, tokenizer: Any, api: VllmApi) -> None:
        """Use a started engine and its tokenizer (`load` does this; tests attach doubles)."""
        self._engine = engine
        self._tokenizer = tokenizer
        self._api = api
        self.window = int(engine.model_config.max_model_len)

    async def aclose(self) -> None:
        """Shut the engine down."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def encode(
        self,
        messages: tuple[ChatTurn, ...],
        reasoning: Reasoning | None = None,
        tools: tuple[Tool, ...] = (),
    ) -> Sequence[int]:
        """The model's chat template (from its tokenizer config), tokenized.

        `enable_thinking` goes to the template, as vLLM's `chat_template_kwargs` does; templates
        without the variable ignore it. `tools` go in OpenAI's form, as vLLM's server passes them.
        """
        tokens: Sequence[int] = self._render(messages, reasoning or Reasoning(), tools, True)
        return tokens

    def opens_reasoning(
        self, messages: tuple[ChatTurn, ...], reasoning: Reasoning, tools: tuple[Tool, ...] = ()
    ) -> bool:
        """True when the generation prompt itself opens a `<think>` block."""
        text: str = self._render(messages, reasoning, tools, False)
        return text.rfind(OPEN_TAG) > text.rfind(CLOSE_TAG)

    def _render(
        self,
        messages: tuple[ChatTurn, ...],
        reasoning: Reasoning,
        tools: tuple[Tool, ...],
        tokenize: bool,
    ) -> Any:
        return self._tokenizer.apply_chat_template(
            template_messages(messages),
            tools=[tool.openai() for tool in tools] or None,
            tokenize=tokenize,
            add_generation_prompt=True,
            enable_thinking=reasoning.enabled,
        )

    def _params(self, request: GenerationRequest) -> Any:
        assert self._api is not None
        kwargs = sampling_kwargs(request.sampling)
        schema = call_schema(request)
        if schema is not None:
            kwargs["structured_outputs"] = self._api.structured_outputs_params(json=schema)
        return self._api.sampling_params(**kwargs, output_kind=self._api.delta)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream deltas from the engine; closing this aborts the request."""
        if self._engine is None:
            raise Unavailable("the vLLM engine is not loaded")
        tools = request.offered_tools
        reserve = generation_reserve(self.window, request.sampling.max_tokens)
        fitted = await asyncio.to_thread(
            fit_to_window,
            request.messages,
            partial(self.encode, reasoning=request.reasoning, tools=tools),
            self.window - reserve,
        )
        inside = await asyncio.to_thread(
            self.opens_reasoning, tuple(fitted.messages), request.reasoning, tools
        )
        splitter = ThinkSplitter(inside=inside)
        calls = CallReader(request)
        prompt_tokens = len(fitted.tokens)
        yield PromptUsage(prompt_tokens)
        request_id = f"{request.request_id or 'req'}-{next(self._ids)}"
        outputs = self._engine.generate(
            {"prompt_token_ids": list(fitted.tokens)}, self._params(request), request_id
        )
        finished: list[GenerationEvent] = []
        try:
            async for output in outputs:
                for event in output_events(output, prompt_tokens, splitter):
                    if isinstance(event, Finished):
                        finished.append(event)  # after the held-back text and the calls
                        continue
                    for item in calls.read(event):
                        yield item
            for event in piece_events(splitter.flush(), 0, splitter.inside):
                for item in calls.read(event):
                    yield item
            for item in [*calls.flush(), *finished]:
                yield item
        finally:
            await outputs.aclose()
            await self._engine.abort(request_id)  # a no-op once finished

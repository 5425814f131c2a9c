"""Any OpenAI-compatible server (llama.cpp's llama-server, vLLM's OpenAI server) as the engine.

Each request is one streamed `POST {upstream_url}/chat/completions` (server-sent events) on a
pooled `httpx.AsyncClient`. Cancel closes the stream, and with it the connection, which is how
both llama-server and vLLM learn to abort the request and free its slot. Upstream failures become
gRPC statuses: unreachable or timed out -> UNAVAILABLE (the next request simply tries again, so the
server recovers when the upstream returns), 429 -> RESOURCE_EXHAUSTED, 5xx -> UNAVAILABLE, other
4xx -> INVALID_ARGUMENT or FAILED_PRECONDITION with the upstream's own message.

The upstream applies its own chat template, stop strings and context window (a prompt that does not
fit comes back as its 400, hence INVALID_ARGUMENT). Usage comes from the stream's usage chunk
(`stream_options.include_usage`), cached prompt tokens from `prompt_tokens_details.cached_tokens`
(vLLM) or `timings.cache_n` (llama-server); an upstream that sends no usage gets completion tokens
counted from the stream and prompt tokens reported as 0.

The offered tools go upstream in OpenAI's form (`tools`, `tool_choice`, `parallel_tool_calls`;
assistant `tool_calls` and `tool` messages with `tool_call_id`), and the upstream's own template
and tool parser do the work (vLLM needs `--enable-auto-tool-choice --tool-call-parser ...` for
"auto", else its 400 is INVALID_ARGUMENT here; llama-server needs `--jinja`). Streamed
`delta.tool_calls` fragments are joined per call index into `ToolCall`s when the choice finishes;
their arguments pass as received, for the servicer to check. A reasoning budget goes as
`thinking_token_budget` (vLLM; a 400 unless it runs with `--reasoning-parser` or
`--reasoning-config`) and `thinking_budget_tokens` (llama-server, its `--reasoning-budget` left at
-1); each server ignores the other's field.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Self

import httpx

from services.llm.backend import (
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
from services.llm.backends.openai_wire import ToolCallFragments, openai_messages, openai_tool_choice
from services.llm.backends.pieces import text_events
from services.llm.reasoning import ThinkSplitter
from services.llm.settings import LlmSettings
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

log = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 500


class OpenAIUpstreamLlmBackend(LlmBackend):
    """Streams chat completions from an OpenAI-compatible server."""

    name = "openai_upstream"

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "",
        api_key: str = "",
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 60.0,
        max_connections: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self.limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self.transport = transport
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: LlmSettings) -> Self:
        """upstream_url, upstream_model (else model), and the key from upstream_api_key_env."""
        return cls(
            settings.upstream_url,
            model=settings.upstream_model or settings.model,
            api_key=os.environ.get(settings.upstream_api_key_env, ""),
            connect_timeout_s=settings.upstream_connect_timeout_s,
            read_timeout_s=settings.upstream_read_timeout_s,
            max_connections=settings.upstream_max_connections,
        )

    @property
    def model_name(self) -> str:
        """The upstream model's name, once known."""
        return self.model or "upstream"

    @property
    def client(self) -> httpx.AsyncClient:
        """The pooled client (created on first use)."""
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=self.timeout,
                limits=self.limits,
                transport=self.transport,
            )
        return self._client

    async def load(self) -> None:
        """Learn the model name if none was set; an upstream that is down is not fatal here."""
        try:
            await self._resolve_model()
        except ServiceError as err:
            log.warning("upstream %s not ready yet: %s", self.base_url, err.message)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _resolve_model(self) -> str:
        if self.model:
            return self.model
        try:
            response = await self.client.get("/models")
        except httpx.TransportError as err:
            raise unreachable(self.base_url, err) from err
        if response.status_code >= 400:
            raise status_error(response.status_code, response.text)
        models = response.json().get("data") or []
        if not models:
            raise FailedPrecondition(f"the upstream at {self.base_url} lists no models")
        self.model = str(models[0]["id"])
        log.info("upstream model: %s", self.model)
        return self.model

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the completion; closing this generator closes the upstream stream."""
        body = request_body(await self._resolve_model(), request)
        try:
            async with contextlib.AsyncExitStack() as stack:
                response = await self._open_stream(stack, body)
                if response.status_code >= 400:
                    raise status_error(response.status_code, (await response.aread()).decode())
                finished = False
                splitter = ThinkSplitter()
                calls = ToolCallFragments()
                async for line in response.aiter_lines():
                    event = parse_event(line)
                    if event is None:
                        continue
                    if event is DONE:
                        finished = True
                        break
                    for item in events_of(event, splitter, calls):
                        yield item
                    finished = finished or finish_reason_of(event) is not None
                if finished:
                    for call in calls.take():  # [DONE] came without a finish reason
                        yield call
                for piece in splitter.flush():  # a held-back "<" that began no tag
                    yield (
                        ReasoningText(piece.text, 0)
                        if piece.reasoning
                        else TokenText(piece.text, 0)
                    )
                if not finished:
                    # llama_cpp.server, for one, ends the stream silently on a prompt over
                    # its window; only its log says why.
                    raise Unavailable(
                        "the upstream LLM server ended the stream before the answer finished "
                        "(no finish reason); its log says why"
                    )
        except httpx.TransportError as err:
            raise unreachable(self.base_url, err) from err

    async def _open_stream(
        self, stack: contextlib.AsyncExitStack, body: dict[str, Any]
    ) -> httpx.Response:
        """Send the request; once more on a fresh connection if a pooled one was found dead.

        The upstream may close a keep-alive connection (after an error, or on restart) just as
        the pool hands it out; the request then fails before any answer, so repeating it is safe.
        """
        for attempt in (1, 2):
            try:
                return await stack.enter_async_context(
                    self.client.stream("POST", "/chat/completions", json=body)
                )
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                if attempt == 2:
                    raise
                log.debug("pooled upstream connection was closed; retrying once")
        raise AssertionError("unreachable")


DONE: dict[str, Any] = {}


def request_body(model: str, request: GenerationRequest) -> dict[str, Any]:
    """The /chat/completions body for `request`."""
    sampling: Sampling = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": openai_messages(request.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        # Not in OpenAI's API, but llama-server, llama_cpp.server and vLLM all take top_k.
        "top_k": sampling.top_k,
        # llama-server and vLLM pass these to the chat template (Nemotron-3-Nano, Qwen3 take
        # enable_thinking); servers that do not know the field ignore it.
        "chat_template_kwargs": {"enable_thinking": request.reasoning.enabled},
    }
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.repetition_penalty != 1.0:
        # vLLM's name, and llama.cpp's.
        body["repetition_penalty"] = sampling.repetition_penalty
        body["repeat_penalty"] = sampling.repetition_penalty
    if request.offered_tools:
        # Only the tools the model is shown, so that NONE hides them from any upstream; the
        # upstream constrains "required" and a named choice itself, where it can.
        body["tools"] = [tool.openai() for tool in request.offered_tools]
        body["tool_choice"] = openai_tool_choice(request.tool_choice)
        # OpenAI's default, not llama-server's: our contract allows several calls in one turn.
        body["parallel_tool_calls"] = True
    budget = request.reasoning.budget_tokens
    if request.reasoning.enabled and budget > 0:
        body["thinking_token_budget"] = budget  # vLLM's name
        body["thinking_budget_tokens"] = budget  # llama-server's
    return body


def parse_event(line: str) -> dict[str, Any] | None:
    """One server-sent-events line: its JSON data, DONE at the end, or None for other lines."""
    if not line.startswith("data:"):
        return None  # blank separators, comments, event names
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return DONE
    try:
        event = json.loads(data)
    except json.JSONDecodeError as err:
        raise Unavailable(f"the upstream sent a malformed event: {data[:80]!r}") from err
    return event if isinstance(event, dict) else None


def events_of(
    event: Mapping[str, Any],
    splitter: ThinkSplitter | None = None,
    calls: ToolCallFragments | None = None,
) -> list[GenerationEvent]:
    """What one server-sent event carries: token texts (one token each), calls, finish, usage.

    Reasoning comes apart from the answer either way a server sends it: in its own field
    (`reasoning_content`, as vLLM and llama-server do with a reasoning parser) or as `<think>`
    tags in the content (`splitter` cuts them out). Tool-call fragments gather in `calls` (kept
    across the stream's events) and come out as `ToolCall`s just before the finish.
    """
    calls = ToolCallFragments() if calls is None else calls
    if "error" in event:
        error = event["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        raise status_error(code if isinstance(code, int) else 500, message)
    items: list[GenerationEvent] = []
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        thought = delta.get("reasoning_content") or delta.get("reasoning")
        if thought:
            items.append(ReasoningText(str(thought)))
        text = delta.get("content")
        if text:
            items += text_events(splitter, str(text), 1) if splitter else [TokenText(str(text))]
        fragments = delta.get("tool_calls")
        if isinstance(fragments, list) and fragments:
            calls.add(fragments)
            if not (thought or text):
                # The call's own token(s): counted, never spoken (usage corrects the count).
                items.append(TokenText("", 1))
        reason = choice.get("finish_reason")
        if reason:
            made = calls.take()
            items += made
            items.append(Finished(finish_reason(str(reason), bool(made))))
    usage = event.get("usage")
    timings = event.get("timings")
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        if cached is None and isinstance(timings, dict):
            cached = timings.get("cache_n")  # llama-server's own report
        completion = usage.get("completion_tokens")
        items.append(
            PromptUsage(
                int(usage.get("prompt_tokens") or 0),
                int(cached or 0),
                int(completion) if completion is not None else None,
            )
        )
    return items


def finish_reason(reason: str, made_calls: bool) -> FinishReason:
    """Ours for an upstream's: vLLM reports a named tool choice's call as "stop"."""
    if reason == "length":
        return FinishReason.LENGTH
    return FinishReason.TOOL_CALLS if made_calls else FinishReason.STOP


def finish_reason_of(event: Mapping[str, Any]) -> str | None:
    """The first choice's finish reason, if the event carries one."""
    for choice in event.get("choices") or []:
        if choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return None


def upstream_message(body: str) -> str:
    """The upstream's error message from its JSON error body (or the raw text)."""
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:_MAX_ERROR_CHARS] or "(no message)"
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if error.get(key):
                    return str(error[key])[:_MAX_ERROR_CHARS]
        elif error:
            return str(error)[:_MAX_ERROR_CHARS]
    return body.strip()[:_MAX_ERROR_CHARS]


def status_error(status: int, body: str) -> ServiceError:
    """The gRPC status for an upstream HTTP error status."""
    message = f"upstream LLM server: HTTP {status}: {upstream_message(body)}"
    if status == 429:
        return ResourceExhausted(message)
    if status in (408, 502, 503, 504) or status >= 500:
        return Unavailable(message)
    if status in (401, 403, 404):
        # The server's configuration (key, model name, URL), not the request, is at fault.
        return FailedPrecondition(message)
    return InvalidArgument(message)


def unreachable(url: str, err: httpx.TransportError) -> Unavailable:
    """UNAVAILABLE for a connection failure or timeout."""
    return Unavailable(
        f"the upstream LLM server at {url} cannot be reached ({type(err).__name__}: "
        f"{str(err) or 'no details'}); retry when it is back"
    )

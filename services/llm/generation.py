"""One GenerateChunks call: chunking, flow control, cancel and the closing `done`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from nemotron.speech.v1 import common_pb2, llm_pb2
from services.llm.backend import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    LlmBackend,
    PromptUsage,
    ReasoningText,
    TokenText,
)
from services.llm.chunker import Chunk, ChunkPolicy, SentenceChunker
from services.llm.tools import ToolCall, check_arguments
from services.runtime import trace_types as names
from services.runtime.errors import DeadlineExceeded, FailedPrecondition
from services.runtime.protocol import opening_request_repeated, unknown_request
from services.runtime.streams import Duplex, cancel_and_wait
from services.runtime.telemetry import Telemetry, context_from

log = logging.getLogger(__name__)

Request = llm_pb2.GenerateChunksRequest
Response = llm_pb2.GenerateChunksResponse

_FINISH_REASONS = {
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: llm_pb2.FINISH_REASON_CANCELLED,
    FinishReason.TOOL_CALLS: llm_pb2.FINISH_REASON_TOOL_CALLS,
}


@dataclass
class GenerationStats:
    """What one generation cost, kept from the backend's events as they arrive."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = FinishReason.STOP
    first_token_at: float | None = None
    last_token_at: float | None = None
    reported_completion_tokens: int | None = None
    reasoning_tokens: int = 0

    def record(self, event: GenerationEvent) -> None:
        """Fold one backend event into the counts and timings."""
        if isinstance(event, ReasoningText):
            self.reasoning_tokens += event.tokens
        if isinstance(event, TokenText | ReasoningText):
            if event.tokens:
                now = time.perf_counter()
                self.completion_tokens += event.tokens
                if self.first_token_at is None:
                    self.first_token_at = now
                self.last_token_at = now
        elif isinstance(event, PromptUsage):
            self.prompt_tokens = event.prompt_tokens
            self.cached_prompt_tokens = event.cached_prompt_tokens
            self.reported_completion_tokens = event.completion_tokens
        elif isinstance(event, Finished):
            self.finish_reason = event.reason

    @property
    def usage_completion_tokens(self) -> int:
        """The engine's own count where it reported one, else the tokens received."""
        reported = self.reported_completion_tokens
        return reported if reported is not None else self.completion_tokens

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens per second between the first and the last token."""
        if self.first_token_at is None or self.last_token_at is None:
            return 0.0
        span = self.last_token_at - self.first_token_at
        return (self.completion_tokens - 1) / span if span > 0 else 0.0


class Generation:
    """The producer (tokens -> chunks) and the reader (continue, cancel) of one call."""

    def __init__(
        self,
        backend: LlmBackend,
        request: GenerationRequest,
        policy: ChunkPolicy,
        wait_for_continue: bool,
        continue_timeout_s: float,
        duplex: Duplex[Response],
        telemetry: Telemetry | None = None,
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.telemetry = telemetry or Telemetry()
        self.request = request
        self.policy = policy
        self.wait_for_continue = wait_for_continue
        self.continue_timeout_s = continue_timeout_s
        self.duplex = duplex
        self.stats = GenerationStats()
        self.started_at = time.perf_counter()
        self.first_chunk_at: float | None = None
        self.chunks_sent = 0
        self.tool_calls_sent = 0
        self.continued_through = -1  # highest chunk index the client has released
        self.released = asyncio.Event()
        self.producer: asyncio.Task[None] | None = None
        self.finished = False
        self.chunk_started_at = self.started_at
        self.span: trace.Span | None = None
        if self.telemetry.enabled:
            # Metadata context (set by the gRPC instrumentation) wins; else the message's.
            parent = (
                None
                if trace.get_current_span().get_span_context().is_valid
                else (context_from(trace_context or {}))
            )
            self.span = self.telemetry.tracer.start_span(
                names.SPAN_LLM_REQUEST, context=parent, attributes=self._request_attributes()
            )

    def start(self) -> None:
        """Begin generating beside the reader."""
        self.producer = self.duplex.spawn(self.produce(), name=f"llm-{self.request.request_id}")

    # ---- reader -------------------------------------------------------------------------------

    async def read(self, requests: AsyncIterator[Request]) -> None:
        """Apply continue and cancel; a half-close releases flow control for the rest."""
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "continue_generation":
                self._continue(request.continue_generation.chunk_index)
            elif kind == "cancel":
                await self.cancel()
                return
            elif kind == "start":
                raise opening_request_repeated("start")
            else:
                raise unknown_request("start, continue_generation or cancel")
        # No continue can arrive after a half-close, so waiting for one would only stall.
        self.continued_through = 1 << 31
        self.released.set()

    def _continue(self, index: int) -> None:
        if index >= self.chunks_sent:
            raise FailedPrecondition(
                f"continue_generation names chunk {index}, but only {self.chunks_sent} "
                "chunks were sent; name the last chunk you received"
            )
        if index > self.continued_through:
            self.continued_through = index
            self.chunk_started_at = time.perf_counter()
            self.released.set()

    async def cancel(self) -> None:
        """Stop generating now and end the call with `done` (CANCELLED)."""
        if self.finished:
            return
        await cancel_and_wait(self.producer)
        if not self.finished:
            self.stats.finish_reason = FinishReason.CANCELLED
            await self._done()

    # ---- producer -----------------------------------------------------------------------------

    async def produce(self) -> None:
        """Pull tokens, cut chunks, wait for continue between chunks, then send `done`."""
        chunker = SentenceChunker(self.policy)
        events = self.backend.generate(self.request)
        uncounted = 0  # tokens whose text has not come yet (part of a character, a stop string)
        try:
            async for event in events:
                self.stats.record(event)
                if isinstance(event, ReasoningText):
                    await self._send_reasoning(event)
                    continue
                if isinstance(event, ToolCall):
                    # The answer before a call is spoken first; the call is not spoken.
                    await self._send_chunks(chunker.flush())
                    await self._send_tool_call(event)
                    continue
                if not isinstance(event, TokenText):
                    continue
                uncounted += event.tokens
                if not event.text:
                    continue
                # The chunker gets the tokens with the text they produced, so that chunk token
                # counts add up to the tokens generated.
                for chunk in chunker.push(event.text, uncounted):
                    await self._send(chunk)
                    await self._await_release(chunk.index)
                uncounted = 0
        finally:
            await events.aclose()
        # `done` waits for the release of the last chunk too, so that a client's
        # continue_generation can never race with the end of the call.
        await self._send_chunks(chunker.flush())
        if self.tool_calls_sent and self.stats.finish_reason is FinishReason.STOP:
            self.stats.finish_reason = FinishReason.TOOL_CALLS
        await self._done()

    async def _send_chunks(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            await self._send(chunk)
            await self._await_release(chunk.index)

    def _request_attributes(self) -> dict[str, Any]:
        sampling = self.request.sampling
        attributes: dict[str, Any] = {
            names.GEN_AI_OPERATION: "chat",
            names.GEN_AI_SYSTEM: self.backend.name,
            names.GEN_AI_REQUEST_MODEL: self.backend.model_name,
            names.GEN_AI_REQUEST_MAX_TOKENS: sampling.max_tokens,
            names.GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
            names.ATTR_BACKEND: self.backend.name,
        }
        if self.telemetry.record_content:
            attributes[names.GEN_AI_INPUT_MESSAGES] = [
                f"{m.role}: {m.content}" for m in self.request.messages
            ]
        return attributes

    async def _send(self, chunk: Chunk) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        if self.span is not None:
            self.telemetry.span_between(
                names.SPAN_LLM_CHUNK,
                self.chunk_started_at,
                time.perf_counter(),
                {names.ATTR_CHUNK_INDEX: chunk.index, names.ATTR_CHUNK_TOKENS: chunk.token_count},
                parent=trace.set_span_in_context(self.span),
            )
        await self.duplex.send(
            Response(
                chunk=llm_pb2.TextChunk(
                    index=chunk.index,
                    text=chunk.text,
                    ends_sentence=chunk.ends_sentence,
                    token_count=chunk.token_count,
                )
            )
        )
        self.chunks_sent = chunk.index + 1

    async def _send_reasoning(self, event: ReasoningText) -> None:
        # Reasoning is not spoken, so it is not flow-controlled; the bounded queue still is.
        if event.text or event.tokens:
            delta = llm_pb2.ReasoningDelta(text=event.text, token_count=event.tokens)
            await self.duplex.send(Response(reasoning=delta))

    async def _send_tool_call(self, call: ToolCall) -> None:
        # A model the server could not constrain (an upstream) may call outside the schema: the
        # client learns why and answers with an error instead of running the tool.
        tools = {tool.name: tool for tool in self.request.offered_tools}
        error = call.error or check_arguments(tools.get(call.name), call.arguments)
        if error:
            # Not the error itself: it may quote the arguments, which come from the conversation.
            log.warning(
                "request %s: tool call %s to %s does not fit its tool",
                self.request.request_id or "-",
                call.id,
                call.name,
            )
        self.tool_calls_sent += 1
        message = llm_pb2.ToolCall(
            id=call.id, name=call.name, arguments_json=call.arguments, error=error
        )
        await self.duplex.send(Response(tool_call=message))

    async def _await_release(self, index: int) -> None:
        if not self.wait_for_continue:
            return
        try:
            async with asyncio.timeout(self.continue_timeout_s):
                while self.continued_through < index:
                    self.released.clear()
                    await self.released.wait()
        except TimeoutError:
            raise DeadlineExceeded(
                f"no continue_generation for chunk {index} within "
                f"{self.continue_timeout_s:g} s; the request was ended to free its sequence"
            ) from None

    async def _done(self) -> None:
        self.finished = True
        now = time.perf_counter()
        first = self.first_chunk_at if self.first_chunk_at is not None else now
        stats = self.stats
        await self.duplex.send(
            Response(
                done=llm_pb2.GenerationDone(
                    finish_reason=_FINISH_REASONS[stats.finish_reason],
                    usage=common_pb2.Usage(
                        prompt_tokens=stats.prompt_tokens,
                        cached_prompt_tokens=stats.cached_prompt_tokens,
                        completion_tokens=stats.usage_completion_tokens,
                        reasoning_tokens=stats.reasoning_tokens,
                    ),
                    timing=common_pb2.Timing(
                        ttfb_ms=1000 * (first - self.started_at),
                        total_ms=1000 * (now - self.started_at),
                    ),
                    tokens_per_second=stats.tokens_per_second,
                    chunk_count=self.chunks_sent,
                )
            )
        )
        self.duplex.finish()
        if self.span is not None:
            self._end_span(first, now)
        log.info(
            "request %s done: %s, %d chunks, %d/%d/%d prompt/cached/completion tokens",
            self.request.request_id or "-",
            stats.finish_reason.value,
            self.chunks_sent,
            stats.prompt_tokens,
            stats.cached_prompt_tokens,
            stats.usage_completion_tokens,
        )

    def _end_span(self, first: float, now: float) -> None:
        assert self.span is not None
        stats = self.stats
        ttfb_ms = 1000 * (first - self.started_at)
        self.span.set_attributes(
            {
                names.ATTR_TTFB_MS: ttfb_ms,
                names.GEN_AI_USAGE_INPUT_TOKENS: stats.prompt_tokens,
                names.GEN_AI_USAGE_CACHED_INPUT_TOKENS: stats.cached_prompt_tokens,
                names.GEN_AI_USAGE_OUTPUT_TOKENS: stats.usage_completion_tokens,
                names.GEN_AI_FINISH_REASONS: [stats.finish_reason.value],
            }
        )
        self.span.end()
        self.telemetry.record_ttfb(
            names.METRIC_LLM_TTFB, ttfb_ms, {names.ATTR_BACKEND: self.backend.name}
        )

    def abandon(self) -> None:
        """End the request span if the call ended without `done` (client went away)."""
        if self.span is not None and not self.finished:
            self.span.set_attribute(names.ATTR_CANCELLED, True)
            self.span.end()
            self.span = None

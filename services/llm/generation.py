"""One GenerateChunks call: chunking, flow control, cancel and the closing `done`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from opentelemetry import trace

from nemotron.speech.v1 import common_pb2, llm_pb2
from services.llm.backend import FinishReason, GenerationRequest, GenerationStats, LlmBackend
from services.llm.chunker import Chunk, ChunkPolicy, SentenceChunker
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
}


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
        tokens = self.backend.generate(self.request, self.stats)
        counted = 0  # completion tokens handed to the chunker
        try:
            async for text in tokens:
                if not text:
                    continue  # its tokens are counted with the next text
                # The backend counts every token it generates, but a token whose text is not
                # complete yet (part of a UTF-8 character, a possible stop string) is yielded
                # with a later one: hand the chunker the true count, so chunk token counts add
                # up to the tokens generated.
                new = max(0, self.stats.completion_tokens - counted)
                counted += new
                for chunk in chunker.push(text, new):
                    await self._send(chunk)
                    await self._await_release(chunk.index)
        finally:
            await tokens.aclose()
        for chunk in chunker.flush():
            await self._send(chunk)
            # `done` waits for the release of the last chunk too, so that a client's
            # continue_generation can never race with the end of the call.
            await self._await_release(chunk.index)
        await self._done()

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
                        completion_tokens=stats.completion_tokens,
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
            stats.completion_tokens,
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
                names.GEN_AI_USAGE_OUTPUT_TOKENS: stats.completion_tokens,
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

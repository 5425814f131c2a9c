"""GrpcChunkedLLMService: Pipecat LLM over LlmService.GenerateChunks, one call per response.

Each chunk the server cuts at a sentence boundary goes downstream as an `LLMChunkFrame`. With
`wait_for_continue` (the default) the server generates chunk N+1 only after this service sends
`continue_generation` for chunk N, which it does when the TTS reports that chunk's segment
complete (`SegmentCompleteFrame`, matched by segment id): on one GPU, speech synthesis of a chunk
never competes with generation of the next. An interruption cancels the call; the server frees
the sequence at once. The channel and the call's lifecycle are the shared `GrpcCallService`'s; a
broken call ends its response with an error rather than being re-opened, since a retried
generation would repeat what the listener already heard.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import grpc
from loguru import logger
from opentelemetry import trace
from opentelemetry.trace import Span
from pipecat.frames.frames import (
    Frame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
)
from pipecat.metrics.metrics import LLMTokenUsage
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import ServiceSettings

from bots.frames import LLMChunkFrame, SegmentCompleteFrame, segment_id_of
from bots.grpc_client import describe
from bots.reconnecting import GrpcCallService
from bots.tracing import ClientSpans
from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.runtime.trace_types import GEN_AI_OPERATION, SPAN_BOT_LLM

ROLES = frozenset({"system", "user", "assistant"})

Request = llm_pb2.GenerateChunksRequest
Response = llm_pb2.GenerateChunksResponse


def chat_messages(messages: Sequence[Any]) -> list[llm_pb2.ChatMessage]:
    """Pipecat context messages as the contract's chat messages.

    Text parts of multi-part content are joined; tool calls, images and empty turns are left
    out because the chunked LLM service speaks plain chat.
    """
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue  # provider-specific messages carry no plain chat
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(
                part.get("text", "") for part in content if isinstance(part, dict)
            ).strip()
        if role in ROLES and isinstance(content, str) and content.strip():
            chat.append(llm_pb2.ChatMessage(role=role, content=content))
    return chat


class GrpcChunkedLLMService(GrpcCallService[Request, Response]):
    """Answers each `LLMContextFrame` with sentence-sized `LLMChunkFrame`s.

    Args:
        target: The LLM server, e.g. "127.0.0.1:8000".
        sampling: Sampling parameters sent with every request (server defaults where unset).
        first_chunk_min_tokens: Smallest first chunk (0: the server's default).
        first_chunk_max_tokens: Largest first chunk (0: the server's default).
        wait_for_continue: Generate each next chunk only when the TTS finished the last one.
        chunk_timeout_s: Longest wait for a connection to the server (one that is restarting)
            and for each next message from it; past it the response ends with an error.
        **kwargs: Passed to Pipecat's `AIService`.
    """

    label = "LLM"
    keep_open = False  # one call per response

    def __init__(
        self,
        *,
        target: str,
        sampling: llm_pb2.SamplingParams | None = None,
        first_chunk_min_tokens: int = 0,
        first_chunk_max_tokens: int = 0,
        wait_for_continue: bool = True,
        chunk_timeout_s: float = 15.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("settings", ServiceSettings(model=None))  # the server picks the model
        super().__init__(target=target, response_timeout_s=chunk_timeout_s, **kwargs)
        self.sampling = sampling or llm_pb2.SamplingParams()
        self.chunking = llm_pb2.ChunkingPolicy(wait_for_continue=wait_for_continue)
        if first_chunk_min_tokens:
            self.chunking.first_chunk_min_tokens = first_chunk_min_tokens
        if first_chunk_max_tokens:
            self.chunking.first_chunk_max_tokens = first_chunk_max_tokens
        self.chunk_timeout_s = chunk_timeout_s
        self.conversation_id = uuid.uuid4().hex
        self.last_usage: llm_pb2.GenerationDone | None = None
        self._request_id = ""
        self._messages: list[llm_pb2.ChatMessage] = []
        self._span: Span | None = None
        self._received: set[int] = set()
        self._spans = ClientSpans(self)
        self._first_chunk_at: float | None = None

    def can_generate_metrics(self) -> bool:
        """TTFB (start sent to first chunk) and token usage go to Pipecat's metrics."""
        return True

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Generate for contexts; release chunks as their speech completes."""
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            if frame.speculation:
                return  # speculative inference is not supported; the confirmed turn follows
            await self._respond(chat_messages(frame.context.get_messages()))
        elif isinstance(frame, SegmentCompleteFrame):
            await self._release(frame.segment_id)
        else:
            await self.push_frame(frame, direction)

    async def _respond(self, messages: list[llm_pb2.ChatMessage]) -> None:
        """One GenerateChunks call; cancelled (interruption) means the call is cancelled."""
        if not messages or self._channel is None:
            return
        self._request_id = request_id = uuid.uuid4().hex[:12]
        self._messages = messages
        self._received = set()
        self._span = span = self._spans.start(SPAN_BOT_LLM, **{GEN_AI_OPERATION: "chat"})
        started = time.perf_counter()
        self._first_chunk_at = None
        await self.push_frame(LLMFullResponseStartFrame())
        await self.start_ttfb_metrics()
        await self.start_processing_metrics()
        try:
            await self._run_call()
        except (grpc.aio.AioRpcError, TimeoutError) as error:
            await self.push_error(f"LLM request {request_id} failed: {self._explain(error)}")
        finally:
            first = self._first_chunk_at
            ClientSpans.end(span, ttfb_ms=None if first is None else 1000 * (first - started))
            self._request_id = ""
            self._span = None
            await self.stop_processing_metrics()
            await self.push_frame(LLMFullResponseEndFrame())

    def _new_call(self, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
        # wait_for_ready: a server that is (re)starting is waited for, within chunk_timeout_s,
        # rather than failing every response until the channel's next reconnect attempt. The
        # span is current while the call starts, so the gRPC client instrumentation carries it.
        span = self._span
        with trace.use_span(span, end_on_exit=False) if span is not None else nullcontext():
            return llm_pb2_grpc.LlmServiceStub(channel).GenerateChunks(wait_for_ready=True)

    async def _on_open(self, call: grpc.aio.StreamStreamCall) -> bool:
        start = llm_pb2.StartGeneration(
            request_id=self._request_id,
            messages=self._messages,
            sampling=self.sampling,
            chunking=self.chunking,
            conversation_id=self.conversation_id,
            trace_context=ClientSpans.carrier(self._span),
        )
        await asyncio.wait_for(call.write(Request(start=start)), self.chunk_timeout_s)
        return True

    def _explain(self, error: BaseException) -> str:
        channel = self._channel
        if isinstance(error, TimeoutError) and channel is not None:
            if channel.get_state() != grpc.ChannelConnectivity.READY:
                return (
                    f"UNAVAILABLE: no connection to {self.target} within {self.chunk_timeout_s:g} s"
                )
        return describe(error)

    async def _on_response(self, response: Response) -> bool:
        kind = response.WhichOneof("response")
        if kind == "done":
            await self._report_usage(response.done)
            return True
        if kind != "chunk":
            # Reasoning (and any kind a newer server adds) is never spoken: only chunks go to TTS.
            return False
        chunk = response.chunk
        if chunk.index == 0:
            self._first_chunk_at = time.perf_counter()
            await self.stop_ttfb_metrics()
        self._received.add(chunk.index)
        await self.push_frame(
            LLMChunkFrame(
                text=chunk.text,
                request_id=self._request_id,
                chunk_index=chunk.index,
                ends_sentence=chunk.ends_sentence,
            )
        )
        return False

    async def _release(self, segment_id: str) -> None:
        """continue_generation for the chunk that segment spoke, if it is of this request."""
        if not self.connected:
            return
        for index in sorted(self._received):
            if segment_id_of(self._request_id, index) == segment_id:
                self._received.discard(index)
                continued = llm_pb2.ContinueGeneration(chunk_index=index)
                if not await self._send(Request(continue_generation=continued)):
                    logger.debug(f"{self}: continue for {segment_id} not sent")
                return

    async def _report_usage(self, done: llm_pb2.GenerationDone) -> None:
        self.last_usage = done
        usage = done.usage
        await self.start_llm_usage_metrics(
            LLMTokenUsage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.prompt_tokens + usage.completion_tokens,
                cache_read_input_tokens=usage.cached_prompt_tokens,
            )
        )

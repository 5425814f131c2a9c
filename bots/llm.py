"""GrpcChunkedLLMService: Pipecat LLM over LlmService.GenerateChunks, one call per response.

Each chunk the server cuts at a sentence boundary goes downstream as an `LLMChunkFrame`. With
`wait_for_continue` (the default) the server generates chunk N+1 only after this service sends
`continue_generation` for chunk N, which it does when the TTS reports that chunk's segment
complete (`SegmentCompleteFrame`, matched by segment id): on one GPU, speech synthesis of a chunk
never competes with generation of the next. An interruption cancels the call; the server frees
the sequence at once. The channel and the call's lifecycle are the shared `GrpcCallService`'s; a
broken call ends its response with an error rather than being re-opened, since a retried
generation would repeat what the listener already heard.

Tools: the context's tools and tool choice go with every request. The calls the model makes
(`tool_call` responses) are never spoken; once the call is done they go to Pipecat's function
calling (`run_function_calls`), which runs the handlers registered with `register_function`, and
the context aggregator appends each call and its result and asks for the next response, the one
that speaks the results. A call whose arguments did not fit its tool's schema is not run: its
result is the server's reason, so that the model can answer or try again.
"""

from __future__ import annotations

import asyncio
import json
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
    FunctionCallFromLLM,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
)
from pipecat.metrics.metrics import LLMTokenUsage
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.processors.frameworks.rtvi import RTVIServerMessageFrame
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings

from bots.frames import LLMChunkFrame, SegmentCompleteFrame, segment_id_of
from bots.grpc_client import describe
from bots.reconnecting import GrpcCallService
from bots.tracing import ClientSpans, trace_link
from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.runtime.trace_types import GEN_AI_OPERATION, SPAN_BOT_LLM

ROLES = frozenset({"system", "user", "assistant", "tool"})
TOOL_CHOICE_MODES = {
    "auto": llm_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": llm_pb2.TOOL_CHOICE_MODE_NONE,
    "required": llm_pb2.TOOL_CHOICE_MODE_REQUIRED,
}

Request = llm_pb2.GenerateChunksRequest
Response = llm_pb2.GenerateChunksResponse


def chat_messages(messages: Sequence[Any]) -> list[llm_pb2.ChatMessage]:
    """Pipecat context messages as the contract's chat messages.

    Text parts of multi-part content are joined. An assistant message's tool calls (in OpenAI's
    format, as Pipecat's context keeps them) and a tool message's result go along. Images,
    provider-specific messages and empty turns are left out, and so is a tool result whose call
    is in no message before it: the server would refuse the whole request for it.
    """
    chat = []
    calls_made: set[str] = set()
    for message in messages:
        if not isinstance(message, Mapping):
            continue  # provider-specific messages carry no plain chat
        role = message.get("role")
        content = _text_of(message.get("content"))
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id in calls_made and content.strip():
                chat.append(llm_pb2.ChatMessage(role=role, content=content, tool_call_id=call_id))
            continue
        calls = _tool_calls(message.get("tool_calls")) if role == "assistant" else []
        if role in ROLES and (content.strip() or calls):
            chat.append(llm_pb2.ChatMessage(role=role, content=content, tool_calls=calls))
            calls_made.update(call.id for call in calls)
    return chat


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict)).strip()
    return content if isinstance(content, str) else ""


def _tool_calls(calls: Any) -> list[llm_pb2.ToolCall]:
    """OpenAI-format calls (`{"id", "function": {"name", "arguments"}}`) as the contract's."""
    converted = []
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not call.get("id"):
            continue
        arguments = function.get("arguments") or "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        converted.append(
            llm_pb2.ToolCall(
                id=str(call["id"]), name=str(function.get("name", "")), arguments_json=arguments
            )
        )
    return converted


def tool_specs(tools: Any) -> list[llm_pb2.Tool]:
    """Tools in OpenAI's format (what Pipecat's default adapter makes of a `ToolsSchema`).

    Tools of other kinds (a provider's built-in tools) have no equivalent and are left out.
    """
    specs = []
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type") != "function":
            continue
        parameters = function.get("parameters")
        specs.append(
            llm_pb2.Tool(
                name=str(function.get("name", "")),
                description=str(function.get("description") or ""),
                parameters_json=json.dumps(parameters) if parameters else "",
            )
        )
    return specs


def tool_choice(choice: Any) -> llm_pb2.ToolChoice | None:
    """An LLMContext tool choice ("auto", "none", "required" or a named function); None: unset."""
    if isinstance(choice, str) and choice in TOOL_CHOICE_MODES:
        return llm_pb2.ToolChoice(mode=TOOL_CHOICE_MODES[choice])
    function = choice.get("function") if isinstance(choice, Mapping) else None
    if isinstance(function, Mapping) and function.get("name"):
        return llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NAMED, name=str(function["name"]))
    return None


def _arguments(arguments_json: str) -> dict[str, Any]:
    """A call's arguments as a mapping; {} for arguments that are not a JSON object."""
    try:
        arguments = json.loads(arguments_json or "{}")
    except json.JSONDecodeError:
        return {}
    return arguments if isinstance(arguments, dict) else {}


def _llm_settings() -> LLMSettings:
    # Every field is set (Pipecat warns about unset ones); sampling is `SamplingParams`', and the
    # server picks the model.
    return LLMSettings(
        model=None,
        system_instruction=None,
        temperature=None,
        max_tokens=None,
        top_p=None,
        top_k=None,
        frequency_penalty=None,
        presence_penalty=None,
        seed=None,
        filter_incomplete_user_turns=False,
        user_turn_completion_config=None,
    )


class GrpcChunkedLLMService(GrpcCallService[Request, Response], LLMService):
    """Answers each `LLMContextFrame` with sentence-sized `LLMChunkFrame`s, or with tool calls.

    A Pipecat `LLMService`, so tools work as with any other: register a handler per tool with
    `register_function` and put the tools' schemas in the context.

    Args:
        target: The LLM server, e.g. "127.0.0.1:8000".
        sampling: Sampling parameters sent with every request (server defaults where unset).
        first_chunk_min_tokens: Smallest first chunk (0: the server's default).
        first_chunk_max_tokens: Largest first chunk (0: the server's default).
        wait_for_continue: Generate each next chunk only when the TTS finished the last one.
        chunk_timeout_s: Longest wait for a connection to the server (one that is restarting)
            and for each next message from it; past it the response ends with an error.
        **kwargs: Passed to Pipecat's `LLMService` (e.g. `run_in_parallel`).
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
        kwargs.setdefault("settings", _llm_settings())
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
        self._tools: list[llm_pb2.Tool] = []
        self._tool_choice: llm_pb2.ToolChoice | None = None
        self._tool_calls: list[llm_pb2.ToolCall] = []
        self._done = False
        self._span: Span | None = None
        self._received: set[int] = set()
        self._spans = ClientSpans(self)
        self._first_chunk_at: float | None = None

    def can_generate_metrics(self) -> bool:
        """TTFB (start sent to first chunk) and token usage go to Pipecat's metrics."""
        return True

    # A non-realtime LLM's metadata frame configures nothing downstream (the context aggregators
    # act only on a realtime one's), so the pipeline sees no more frames than before this was an
    # LLMService; the base declares the frame non-optional, hence the ignore.
    def service_metadata_frame(self) -> None:  # type: ignore[override]
        """No metadata to broadcast at start."""
        return None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Generate for contexts; release chunks as their speech completes."""
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            if frame.speculation:
                return  # speculative inference is not supported; the confirmed turn follows
            await self._respond(frame.context)
        elif isinstance(frame, SegmentCompleteFrame):
            await self._release(frame.segment_id)
        else:
            await self.push_frame(frame, direction)

    async def _respond(self, context: LLMContext) -> None:
        """One GenerateChunks call, then its tool calls; an interruption cancels the call."""
        messages = chat_messages(context.get_messages())
        if not messages or self._channel is None:
            return
        self._request_id = request_id = uuid.uuid4().hex[:12]
        self._messages = messages
        # The adapter adds the tools Pipecat itself offers (cancelling an async call) to the
        # context's, in OpenAI's format.
        self._tools = tool_specs(self.get_llm_adapter().from_standard_tools(context.tools))
        self._tool_choice = tool_choice(context.tool_choice) if self._tools else None
        self._tool_calls = []
        self._done = False
        self._received = set()
        self._span = span = self._spans.start(SPAN_BOT_LLM, **{GEN_AI_OPERATION: "chat"})
        started = time.perf_counter()
        self._first_chunk_at = None
        await self.push_frame(LLMFullResponseStartFrame())
        await self.start_ttfb_metrics()
        await self.start_processing_metrics()
        try:
            if span is not None:  # a client (the browser page, over RTVI) links the turn to it
                await self.push_frame(RTVIServerMessageFrame(data=trace_link(span)))
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
        # After the response's end, so that the context has what was said before the calls
        # ahead of them. Calls of a call that broke before `done` may be incomplete: not run.
        if self._done and self._tool_calls:
            await self._call_tools(self._tool_calls, context)

    async def _call_tools(self, calls: Sequence[llm_pb2.ToolCall], context: LLMContext) -> None:
        """Run the model's calls; answer each one whose arguments broke its schema with why."""
        runnable = [call for call in calls if not call.error]
        broken = [call for call in calls if call.error]
        for index, call in enumerate(broken):
            # Not the error itself: it may quote the arguments, which come from what the user said.
            logger.warning(f"{self}: call {call.id} to {call.name} does not fit its tool; not run")
            # The last one asks for the next response, unless calls that run will.
            await self._answer_broken_call(call, run_llm=index == len(broken) - 1 and not runnable)
        await self.run_function_calls(
            [
                FunctionCallFromLLM(
                    function_name=call.name,
                    tool_call_id=call.id,
                    arguments=_arguments(call.arguments_json),
                    context=context,
                )
                for call in runnable
            ]
        )

    async def _answer_broken_call(self, call: llm_pb2.ToolCall, run_llm: bool) -> None:
        """The call and its error as the result, through the frames a run call's result takes.

        Pipecat's function calling has no way to answer one call of a batch without running its
        handler, so these are the frames `run_function_calls` sends for a call that runs.
        """
        arguments = _arguments(call.arguments_json)
        await self.broadcast_frame(
            FunctionCallInProgressFrame,
            function_name=call.name,
            tool_call_id=call.id,
            arguments=arguments,
            cancel_on_interruption=True,
        )
        await self.broadcast_frame(
            FunctionCallResultFrame,
            function_name=call.name,
            tool_call_id=call.id,
            arguments=arguments,
            result={"error": f"The call was not run: {call.error}"},
            run_llm=run_llm,
            error=call.error,
        )

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
            tools=self._tools,
            tool_choice=self._tool_choice,
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
            self._done = True
            await self._report_usage(response.done)
            return True
        if kind == "tool_call":
            await self.stop_ttfb_metrics()  # a call may be all the model answers
            self._tool_calls.append(response.tool_call)  # run once the call is done
            return False
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

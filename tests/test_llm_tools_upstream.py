"""Tool calls through the openai_upstream backend: the body sent upstream, the fragments joined.

A scripted upstream (an httpx MockTransport double) streams OpenAI chunks with two calls whose
fragments interleave across chunks; the LLM gRPC server in front of it is real. The last test
runs against a real llama_cpp.server, whose named tool choice constrains the arguments.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backend import (
    ChatTurn,
    Finished,
    FinishReason,
    GenerationRequest,
    PromptUsage,
    Sampling,
    TokenText,
)
from services.llm.backends.openai_upstream import (
    OpenAIUpstreamLlmBackend,
    events_of,
    request_body,
)
from services.llm.backends.openai_wire import ToolCallFragments
from services.llm.generation import GenerationStats
from services.llm.reasoning import Reasoning
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.llm.tools import Tool, ToolCall, ToolChoice, ToolChoiceMode
from tests.helpers import read_all
from tests.servers import channel_to, free_port, running
from tests.test_llm_upstream import start_upstream, stop_upstream

Req = llm_pb2.GenerateChunksRequest
TIMER_SCHEMA = {
    "type": "object",
    "properties": {"seconds": {"type": "integer", "minimum": 1}},
    "required": ["seconds"],
}
TIMER = llm_pb2.Tool(
    name="set_timer",
    description="Start a countdown timer.",
    parameters_json=json.dumps(TIMER_SCHEMA),
)
CLOCK = llm_pb2.Tool(name="get_time", description="The current local time.")
QUESTION = "What time is it? And set a timer for 5 minutes."


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


def fragment(index: int, arguments: str, **first: str) -> dict[str, Any]:
    """One `delta.tool_calls` entry; `first` (id, name) only on a call's first fragment."""
    function = {"arguments": arguments} | ({"name": first["name"]} if "name" in first else {})
    entry: dict[str, Any] = {"index": index, "function": function}
    if "id" in first:
        entry |= {"id": first["id"], "type": "function"}
    return entry


def finish(reason: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 17}}
# Two calls in one turn, as vLLM streams them: the answer first, then fragments whose indices
# interleave, the arguments cut mid-token.
CALLING = (
    delta(role="assistant", content="Let me"),
    delta(content=" check."),
    delta(tool_calls=[fragment(0, "", id="call_up_1", name="get_time")]),
    delta(tool_calls=[fragment(1, '{"sec', id="call_up_2", name="set_timer")]),
    delta(tool_calls=[fragment(0, "{")]),
    delta(tool_calls=[fragment(1, 'onds": 3')]),
    delta(tool_calls=[fragment(0, "}")]),
    delta(tool_calls=[fragment(1, "00}")]),
    finish("tool_calls"),
    USAGE,
)
ANSWERING = (
    delta(role="assistant", content="It is 14:05"),
    delta(content=" and the timer is set."),
    finish("stop"),
)


class ToolCallingUpstreamDouble:
    """An OpenAI-compatible server that calls tools: it streams CALLING for a user's question
    and ANSWERING once the last message is a tool result; it keeps every request body."""

    def __init__(self, calling: tuple[dict[str, Any], ...] = CALLING) -> None:
        self.calling = calling
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        script = ANSWERING if body["messages"][-1]["role"] == "tool" else self.calling
        return httpx.Response(
            200, content=sse(*script), headers={"content-type": "text/event-stream"}
        )


def settings() -> LlmSettings:
    return LlmSettings(port=0, max_streams=4, shutdown_grace_s=0.5)


@pytest.fixture
def upstream() -> ToolCallingUpstreamDouble:
    return ToolCallingUpstreamDouble()


async def serve(handler: Any) -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    backend = OpenAIUpstreamLlmBackend(
        "http://upstream.invalid/v1", model="m", transport=httpx.MockTransport(handler)
    )
    async with running(LlmService(settings(), backend)) as server, channel_to(server) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


@pytest.fixture
async def stub(upstream) -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    async for stub in serve(upstream):
        yield stub


def start(
    *messages: llm_pb2.ChatMessage,
    choice: llm_pb2.ToolChoice | None = None,
    tools: tuple[llm_pb2.Tool, ...] = (CLOCK, TIMER),
) -> Req:
    return Req(
        start=llm_pb2.StartGeneration(
            messages=list(messages) or [llm_pb2.ChatMessage(role="user", content=QUESTION)],
            sampling=llm_pb2.SamplingParams(temperature=0.0, max_tokens=64),
            chunking=llm_pb2.ChunkingPolicy(first_chunk_min_tokens=1),
            tools=list(tools),
            tool_choice=choice,
        )
    )


async def test_interleaved_fragments_become_two_calls_after_the_spoken_part(stub, upstream):
    responses = await read_all(stub.GenerateChunks(iter([start()])))
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds == ["chunk", "tool_call", "tool_call", "done"]
    assert responses[0].chunk.text.strip() == "Let me check."
    calls = [r.tool_call for r in responses if r.HasField("tool_call")]
    assert [(c.id, c.name, json.loads(c.arguments_json), c.error) for c in calls] == [
        ("call_up_1", "get_time", {}, ""),
        ("call_up_2", "set_timer", {"seconds": 300}, ""),
    ]
    done = responses[-1].done
    assert done.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    assert done.usage.completion_tokens == 17  # the upstream's own count wins
    body = upstream.bodies[-1]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {"type": "object", "properties": {}},
                "description": "The current local time.",
            },
        },
        {
            "type": "function",
            "function": {
                "name": "set_timer",
                "parameters": TIMER_SCHEMA,
                "description": "Start a countdown timer.",
            },
        },
    ]
    assert body["tool_choice"] == "auto"
    assert body["parallel_tool_calls"] is True


async def test_the_calls_and_their_results_go_back_upstream_in_openai_form(stub, upstream):
    first = await read_all(stub.GenerateChunks(iter([start()])))
    calls = [r.tool_call for r in first if r.HasField("tool_call")]
    results = {"get_time": "14:05", "set_timer": "timer set"}
    conversation = [
        llm_pb2.ChatMessage(role="user", content=QUESTION),
        llm_pb2.ChatMessage(
            role="assistant",
            tool_calls=[
                llm_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json)
                for c in calls
            ],
        ),
        *(
            llm_pb2.ChatMessage(role="tool", tool_call_id=c.id, content=results[c.name])
            for c in calls
        ),
    ]
    second = await read_all(stub.GenerateChunks(iter([start(*conversation)])))
    assert "".join(r.chunk.text for r in second if r.HasField("chunk")).startswith("It is 14:05")
    assert second[-1].done.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert upstream.bodies[-1]["messages"] == [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_up_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                },
                {
                    "id": "call_up_2",
                    "type": "function",
                    "function": {"name": "set_timer", "arguments": '{"seconds": 300}'},
                },
            ],
        },
        {"role": "tool", "content": "14:05", "tool_call_id": "call_up_1"},
        {"role": "tool", "content": "timer set", "tool_call_id": "call_up_2"},
    ]


@pytest.mark.parametrize(
    ("choice", "expected", "tools"),
    [
        (llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_REQUIRED), "required", 2),
        (
            llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NAMED, name="set_timer"),
            {"type": "function", "function": {"name": "set_timer"}},
            1,  # only the tool the model is shown
        ),
        (llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NONE), None, 0),
    ],
)
async def test_tool_choice_goes_upstream_in_openai_form(stub, upstream, choice, expected, tools):
    await read_all(stub.GenerateChunks(iter([start(choice=choice)])))
    body = upstream.bodies[-1]
    assert body.get("tool_choice") == expected
    assert len(body.get("tools", [])) == tools


async def test_arguments_pass_as_received_and_the_servicer_flags_a_misfit():
    upstream = ToolCallingUpstreamDouble(
        (
            delta(tool_calls=[fragment(0, '{"seconds": "soon"}', id="c9", name="set_timer")]),
            finish("tool_calls"),
        )
    )
    async for stub in serve(upstream):
        responses = await read_all(stub.GenerateChunks(iter([start()])))
    (call,) = [r.tool_call for r in responses if r.HasField("tool_call")]
    assert call.arguments_json == '{"seconds": "soon"}'
    assert "integer" in call.error
    assert responses[-1].done.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS


# ---- the fragments, event by event ----------------------------------------------------------


def run(events: tuple[dict[str, Any], ...]) -> list[Any]:
    calls = ToolCallFragments()
    return [item for event in events for item in events_of(event, None, calls)]


def test_call_fragments_count_as_completion_tokens_without_a_usage_chunk():
    stats = GenerationStats()
    items = run(CALLING[:-1])
    for item in items:
        stats.record(item)
    assert stats.completion_tokens == 2 + 6  # two answer deltas, six fragment deltas
    assert items[-1] == Finished(FinishReason.TOOL_CALLS)
    assert [type(i).__name__ for i in items[-3:]] == ["ToolCall", "ToolCall", "Finished"]


def test_an_upstream_without_ids_or_indices_gets_our_ids():
    items = run(
        (
            delta(tool_calls=[{"function": {"name": "get_time", "arguments": "{"}}]),
            delta(tool_calls=[{"function": {"arguments": "}"}}]),
            finish("stop"),
        )
    )
    (call,) = [i for i in items if isinstance(i, ToolCall)]
    assert call.name == "get_time" and call.arguments == "{}"
    assert call.id.startswith("call_") and len(call.id) == 29
    # Calls made under a "stop" (vLLM's named tool choice) still end the turn as calls.
    assert items[-1] == Finished(FinishReason.TOOL_CALLS)


def test_a_server_that_repeats_id_and_name_in_every_fragment_is_not_doubled():
    # llama_cpp.server does this, with a legacy `function_call` beside.
    repeated = {"index": 0, "id": "call__0_set_timer_x", "type": "function"}
    pieces = [
        delta(
            function_call={"name": "set_timer", "arguments": piece},
            tool_calls=[repeated | {"function": {"name": "set_timer", "arguments": piece}}],
        )
        for piece in ('{"seconds"', ": 9", "}")
    ]
    items = run((*pieces, finish("tool_calls")))
    (call,) = [i for i in items if isinstance(i, ToolCall)]
    assert (call.id, call.name, call.arguments) == (
        "call__0_set_timer_x",
        "set_timer",
        '{"seconds": 9}',
    )


def test_arguments_sent_whole_as_an_object_are_kept_as_json():
    items = run(
        (
            delta(tool_calls=[fragment(0, "", id="a", name="set_timer")]),
            delta(tool_calls=[{"index": 0, "function": {"arguments": {"seconds": 5}}}]),
            finish("length"),
        )
    )
    assert [i for i in items if isinstance(i, ToolCall)] == [
        ToolCall("a", "set_timer", '{"seconds": 5}')
    ]
    assert items[-1] == Finished(FinishReason.LENGTH)


async def test_calls_still_come_when_the_stream_ends_without_a_finish_reason():
    def handler(request: httpx.Request) -> httpx.Response:
        body = sse(delta(tool_calls=[fragment(0, "{}", id="c1", name="get_time")]))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    backend = OpenAIUpstreamLlmBackend(
        "http://upstream.invalid/v1", model="m", transport=httpx.MockTransport(handler)
    )
    request = GenerationRequest(
        "r", (ChatTurn("user", "time?"),), Sampling(), tools=(Tool("get_time"),)
    )
    events = [event async for event in backend.generate(request)]
    await backend.aclose()
    assert events == [TokenText("", 1), ToolCall("c1", "get_time", "{}")]


# ---- the body -------------------------------------------------------------------------------


def body_for(**fields: Any) -> dict[str, Any]:
    request = GenerationRequest("r", (ChatTurn("user", "Hi"),), Sampling(), **fields)
    return request_body("m", request)


def test_a_request_without_tools_sends_none_of_the_tool_fields():
    body = body_for()
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & body.keys()


def test_a_reasoning_budget_goes_by_vllms_and_llama_servers_names():
    body = body_for(reasoning=Reasoning(enabled=True, budget_tokens=64))
    assert body["thinking_token_budget"] == 64
    assert body["thinking_budget_tokens"] == 64
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    for reasoning in (Reasoning(enabled=True), Reasoning(enabled=False, budget_tokens=64)):
        assert "thinking_token_budget" not in body_for(reasoning=reasoning)
        assert "thinking_budget_tokens" not in body_for(reasoning=reasoning)


def test_a_named_choice_offers_only_the_named_tool():
    body = body_for(
        tools=(Tool("get_time"), Tool("set_timer", "", TIMER_SCHEMA)),
        tool_choice=ToolChoice(ToolChoiceMode.NAMED, "set_timer"),
    )
    assert [t["function"]["name"] for t in body["tools"]] == ["set_timer"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "set_timer"}}


def test_a_tool_calls_finish_without_calls_is_a_stop():
    items = run((finish("tool_calls"), USAGE))
    assert items == [Finished(FinishReason.STOP), PromptUsage(50, 0, 17)]


# ---- against a real upstream ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_upstream() -> Iterator[str]:
    port = free_port()
    process = start_upstream(port)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_upstream(process)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_llama_cpp_servers_named_choice_makes_a_call_that_fits_the_schema(real_upstream):
    # llama_cpp.server turns a named tool choice into a grammar from the tool's schema, with any
    # chat template (SmolLM2's knows nothing of tools); "required" and "auto" it ignores.
    backend = OpenAIUpstreamLlmBackend(real_upstream, read_timeout_s=60)
    choice = llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NAMED, name="set_timer")
    history = [
        llm_pb2.ChatMessage(role="user", content="What time is it?"),
        llm_pb2.ChatMessage(
            role="assistant",
            tool_calls=[llm_pb2.ToolCall(id="call_1", name="get_time", arguments_json="{}")],
        ),
        llm_pb2.ChatMessage(role="tool", tool_call_id="call_1", content="14:05"),
        llm_pb2.ChatMessage(role="user", content="Set a timer for 5 minutes."),
    ]
    async with running(LlmService(settings(), backend)) as server, channel_to(server) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        responses = await read_all(stub.GenerateChunks(iter([start(*history, choice=choice)])))
    (call,) = [r.tool_call for r in responses if r.HasField("tool_call")]
    assert call.name == "set_timer" and not call.error
    assert call.id.startswith("call_")
    assert json.loads(call.arguments_json)["seconds"] >= 1
    assert not any(r.HasField("chunk") for r in responses)
    done = responses[-1].done
    assert done.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    assert done.usage.completion_tokens >= 3

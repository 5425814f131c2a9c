"""Tool calls over gRPC: the contract's checks, calls streamed apart, results fed back."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator

import grpc
import pytest

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.llm.tools import Tool as ToolSpec
from services.llm.tools import ToolCallSplitter, ToolChoiceMode, call_from_json, check_arguments
from tests.doubles import ToolCallingLlmBackendDouble
from tests.helpers import field_violation, read_all
from tests.servers import channel_to, running, target_of

Req = llm_pb2.GenerateChunksRequest
TIMER = llm_pb2.Tool(
    name="set_timer",
    description="Start a countdown timer.",
    parameters_json=json.dumps(
        {
            "type": "object",
            "properties": {"seconds": {"type": "integer", "minimum": 1}},
            "required": ["seconds"],
        }
    ),
)
CLOCK = llm_pb2.Tool(name="get_time", description="The current local time.")
CALLS = (("get_time", "{}"), ("set_timer", '{"seconds": 300}'))


def start(
    *messages: llm_pb2.ChatMessage,
    tools: tuple[llm_pb2.Tool, ...] = (CLOCK, TIMER),
    choice: llm_pb2.ToolChoice | None = None,
) -> Req:
    return Req(
        start=llm_pb2.StartGeneration(
            messages=list(messages) or [user("What time is it? And set a timer for 5 minutes.")],
            chunking=llm_pb2.ChunkingPolicy(first_chunk_min_tokens=1),
            tools=list(tools),
            tool_choice=choice,
        )
    )


def user(text: str) -> llm_pb2.ChatMessage:
    return llm_pb2.ChatMessage(role="user", content=text)


async def serve(double: ToolCallingLlmBackendDouble) -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    settings = LlmSettings(port=0, max_streams=4, shutdown_grace_s=0.5)
    async with running(LlmService(settings, double)) as server, channel_to(server) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


@pytest.fixture
def double() -> ToolCallingLlmBackendDouble:
    return ToolCallingLlmBackendDouble(CALLS)


@pytest.fixture
async def stub(double) -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    async for stub in serve(double):
        yield stub


async def test_two_calls_in_one_turn_come_after_the_spoken_part_and_end_the_turn(stub, double):
    responses = await read_all(stub.GenerateChunks(iter([start()])))
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds == ["chunk", "tool_call", "tool_call", "done"]
    assert responses[0].chunk.text.strip() == "Let me check."
    calls = [r.tool_call for r in responses if r.HasField("tool_call")]
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_time", {}),
        ("set_timer", {"seconds": 300}),
    ]
    assert all(c.id.startswith("call_") and not c.error for c in calls)
    assert len({c.id for c in calls}) == 2
    done = responses[-1].done
    assert done.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    # The calls' tokens count as completion tokens, though no chunk carries them.
    assert done.usage.completion_tokens == 3 + 2 * 5
    request = double.requests[-1]
    assert [t.name for t in request.tools] == ["get_time", "set_timer"]
    assert request.tool_choice.mode is ToolChoiceMode.AUTO


async def test_a_call_then_its_result_then_the_spoken_answer(stub, double):
    first = await read_all(stub.GenerateChunks(iter([start()])))
    calls = [r.tool_call for r in first if r.HasField("tool_call")]
    results = {"get_time": "14:05", "set_timer": "timer set for 300 seconds"}
    messages = [
        user("What time is it? And set a timer for 5 minutes."),
        llm_pb2.ChatMessage(
            role="assistant",
            content="Let me check.",
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
    second = await read_all(stub.GenerateChunks(iter([start(*messages)])))
    answer = "".join(r.chunk.text for r in second if r.HasField("chunk"))
    assert "14:05" in answer and "timer set for 300 seconds" in answer
    assert not any(r.HasField("tool_call") for r in second)
    assert second[-1].done.finish_reason == llm_pb2.FINISH_REASON_STOP
    turns = double.requests[-1].messages
    assert [t.role for t in turns] == ["user", "assistant", "tool", "tool"]
    assert [c.name for c in turns[1].tool_calls] == ["get_time", "set_timer"]
    assert turns[2].tool_call_id == calls[0].id


async def test_a_call_that_breaks_its_schema_comes_with_the_reason():
    double = ToolCallingLlmBackendDouble([("set_timer", '{"seconds": "soon"}'), ("nope", "{}")])
    async for stub in serve(double):
        responses = await read_all(stub.GenerateChunks(iter([start()])))
    calls = [r.tool_call for r in responses if r.HasField("tool_call")]
    assert "seconds" in calls[0].error and "integer" in calls[0].error
    assert "does not offer" in calls[1].error


async def test_with_tool_choice_none_the_model_sees_no_tools_and_answers(stub, double):
    choice = llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NONE)
    responses = await read_all(stub.GenerateChunks(iter([start(choice=choice)])))
    assert not any(r.HasField("tool_call") for r in responses)
    assert double.requests[-1].offered_tools == ()


def schema_tool(schema: object) -> llm_pb2.Tool:
    return llm_pb2.Tool(name="bad", parameters_json=json.dumps(schema))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            start(tools=(CLOCK, schema_tool({"type": "object", "properties": 3}))),
            "start.tools[1].parameters_json",
        ),
        (start(tools=(schema_tool({"type": "string"}),)), "start.tools[0].parameters_json"),
        (
            start(tools=(llm_pb2.Tool(name="x", parameters_json="{oops"),)),
            "start.tools[0].parameters_json",
        ),
        (start(tools=(llm_pb2.Tool(name="has space"),)), "start.tools[0].name"),
        (start(tools=(CLOCK, CLOCK)), "start.tools[1].name"),
        (
            start(choice=llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NAMED, name="other")),
            "start.tool_choice.name",
        ),
        (
            start(tools=(), choice=llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_REQUIRED)),
            "start.tool_choice.mode",
        ),
        (start(choice=llm_pb2.ToolChoice(mode=9)), "start.tool_choice.mode"),
        (
            start(user("Hi"), llm_pb2.ChatMessage(role="tool", tool_call_id="call_x", content="1")),
            "start.messages[1].tool_call_id",
        ),
        (
            start(
                user("Hi"),
                llm_pb2.ChatMessage(
                    role="assistant",
                    tool_calls=[llm_pb2.ToolCall(id="c1", name="get_time", arguments_json="[1]")],
                ),
                llm_pb2.ChatMessage(role="tool", tool_call_id="c1", content="1"),
            ),
            "start.messages[1].tool_calls[0].arguments_json",
        ),
        (
            start(user("Hi"), llm_pb2.ChatMessage(role="tool", tool_call_id="c1", content="")),
            "start.messages[1].tool_call_id",
        ),
        (start(tools=tuple(llm_pb2.Tool(name=f"t{i}") for i in range(33))), "start.tools"),
    ],
)
async def test_malformed_tools_are_invalid_and_name_the_field(stub, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(stub.GenerateChunks(iter([request_])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violation(caught.value) == field
    assert caught.value.details()


def test_the_splitter_cuts_calls_out_of_any_token_stream():
    splitter = ToolCallSplitter()
    pieces = []
    for token in [
        "Sure",
        ". <tool",
        '_call>{"name": ',
        '"a"}</tool_',
        "call>",
        "\n<tool_call>{}",
        "</tool_call>",
    ]:
        pieces += splitter.push(token)
    pieces += splitter.flush()
    assert [(p.text, p.call) for p in pieces] == [
        ("Sure", False),
        (". ", False),
        ('{"name": "a"}', True),
        ("{}", True),
    ]
    plain = ToolCallSplitter()
    assert [p.text for p in plain.push("1 < 2 <tool") + plain.flush()] == ["1 < 2 ", "<tool"]


def test_calls_are_read_from_json_and_checked_against_the_schema():
    call = call_from_json('{"name": "set_timer", "arguments": {"seconds": 5}}')
    assert call is not None and json.loads(call.arguments) == {"seconds": 5}
    assert call_from_json("[1]") is None and call_from_json("not json") is None
    timer = ToolSpec("set_timer", "", json.loads(TIMER.parameters_json))
    assert check_arguments(timer, call.arguments) == ""
    assert "required" in check_arguments(timer, "{}")
    assert "not JSON" in check_arguments(timer, "{")


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl comes with the dev group")
async def test_grpcurl_describes_the_tool_messages_with_their_documentation():
    settings = LlmSettings(port=0, max_streams=2, shutdown_grace_s=0.5)
    async with running(LlmService(settings, ToolCallingLlmBackendDouble(CALLS))) as server:

        def describe(symbol: str) -> str:
            command = ["grpcurl", "-plaintext", target_of(server), "describe", symbol]
            return subprocess.run(
                command, capture_output=True, text=True, timeout=30, check=True
            ).stdout

        tool = await asyncio.to_thread(describe, "nemotron.speech.v1.Tool")
        call = await asyncio.to_thread(describe, "nemotron.speech.v1.ToolCall")
        choice = await asyncio.to_thread(describe, "nemotron.speech.v1.ToolChoiceMode")
    assert "parameters_json" in tool and "JSON Schema" in tool
    assert "arguments_json" in call and "error result" in call
    assert "TOOL_CHOICE_MODE_REQUIRED" in choice and "at least one tool" in choice

"""The vllm backend: its pure mapping here; the engine itself only where vLLM and a GPU are."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import jsonschema
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
from services.llm.backends.openai_wire import template_messages
from services.llm.backends.vllm import (
    CallReader,
    VllmApi,
    VllmLlmBackend,
    call_schema,
    finish_reason,
    output_events,
    sampling_kwargs,
)
from services.llm.generation import GenerationStats
from services.llm.reasoning import Reasoning
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.llm.tools import Tool, ToolCall, ToolChoice, ToolChoiceMode
from tests.helpers import read_all
from tests.servers import channel_to, running


def test_choosing_vllm_imports_nothing_of_it_until_load():
    loaded = set(sys.modules)
    backend = VllmLlmBackend.from_settings(LlmSettings(backend="vllm", model="org/Some-Model"))
    assert backend.model_name == "Some-Model"
    assert not any(name == "vllm" or name.startswith("vllm.") for name in set(sys.modules) - loaded)


async def test_loading_without_vllm_installed_says_how_to_install_it():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    backend = VllmLlmBackend("org/Some-Model")
    with pytest.raises(ImportError, match=re.escape("nemotron-speech-mesh[vllm]")):
        await backend.load()


def test_the_backend_needs_a_model():
    with pytest.raises(ValueError, match="NEMOTRON_LLM_MODEL"):
        VllmLlmBackend.from_settings(LlmSettings(backend="vllm"))


def test_sampling_maps_to_vllm_arguments():
    kwargs = sampling_kwargs(Sampling(temperature=0.0, top_k=0, max_tokens=9, seed=4, stop=("x",)))
    assert kwargs == {
        "temperature": 0.0,
        "top_p": 0.95,
        "top_k": 0,
        "max_tokens": 9,
        "repetition_penalty": 1.0,
        "stop": ["x"],
        "seed": 4,
    }
    assert "seed" not in sampling_kwargs(Sampling())


def test_delta_outputs_carry_texts_tokens_cache_and_finish():
    stats = GenerationStats()

    def output(text, tokens, reason=None):
        completion = SimpleNamespace(text=text, token_ids=tokens, finish_reason=reason)
        return SimpleNamespace(num_cached_tokens=16, outputs=[completion])

    first = output_events(output("Hello", [1]), 20)
    assert first == [PromptUsage(20, 16), TokenText("Hello", 1)]
    second = output_events(output(" world", [2, 3], "length"), 20)
    assert second[1:] == [TokenText(" world", 2), Finished(FinishReason.LENGTH)]
    for event in (*first, *second):
        stats.record(event)
    assert stats.completion_tokens == 3
    assert stats.cached_prompt_tokens == 16
    assert stats.finish_reason == FinishReason.LENGTH
    assert finish_reason("stop") == FinishReason.STOP
    assert finish_reason("abort") == FinishReason.CANCELLED


TIMER_SCHEMA = {
    "type": "object",
    "properties": {"seconds": {"type": "integer", "minimum": 1}},
    "required": ["seconds"],
}
TOOLS = (Tool("get_time", "The current local time."), Tool("set_timer", "", TIMER_SCHEMA))


def tool_request(
    mode: ToolChoiceMode = ToolChoiceMode.AUTO, name: str = "", reasoning: bool = False
) -> GenerationRequest:
    return GenerationRequest(
        "t",
        (ChatTurn("user", "Time? And a 5 minute timer."),),
        Sampling(),
        reasoning=Reasoning(enabled=reasoning),
        tools=TOOLS,
        tool_choice=ToolChoice(mode, name),
    )


def test_calls_and_results_reach_the_template_with_arguments_as_objects():
    turns = (
        ChatTurn("user", "Set a timer."),
        ChatTurn(
            "assistant",
            "",
            (ToolCall("c1", "set_timer", '{"seconds": 300}'), ToolCall("c2", "x", "[broken")),
        ),
        ChatTurn("tool", "timer set", tool_call_id="c1"),
    )
    messages = template_messages(turns)
    calls = messages[1]["tool_calls"]
    assert calls[0] == {
        "id": "c1",
        "type": "function",
        "function": {"name": "set_timer", "arguments": {"seconds": 300}},
    }
    assert calls[1]["function"]["arguments"] == "[broken"  # left as written
    assert messages[2] == {
        "role": "tool",
        "content": "timer set",
        "tool_call_id": "c1",
        "name": "set_timer",  # some templates print the tool's name
    }


def test_required_and_named_choices_constrain_the_answer_to_calls():
    named = call_schema(tool_request(ToolChoiceMode.NAMED, "set_timer"))
    assert named == TIMER_SCHEMA
    required = call_schema(tool_request(ToolChoiceMode.REQUIRED))
    assert required is not None
    validator = jsonschema.Draft202012Validator(required)
    assert validator.is_valid([{"name": "set_timer", "arguments": {"seconds": 5}}])
    assert validator.is_valid([{"name": "get_time", "arguments": {}}] * 2)
    assert not validator.is_valid([])
    assert not validator.is_valid([{"name": "set_timer", "arguments": {}}])
    assert not validator.is_valid([{"name": "other", "arguments": {}}])
    # AUTO is free; with reasoning on, the constraint would bind the reasoning too.
    assert call_schema(tool_request()) is None
    assert call_schema(tool_request(ToolChoiceMode.REQUIRED, reasoning=True)) is None


def read(reader: CallReader, pieces: list[tuple[str, int]]) -> list[Any]:
    events = [e for text, tokens in pieces for e in reader.read(TokenText(text, tokens))]
    return events + reader.flush()


def test_tagged_calls_are_cut_out_of_the_text_and_their_tokens_still_count():
    pieces = [
        ("Let me", 1),
        (" check. <tool", 2),
        ('_call>{"name": "get_time", "arguments": {}}</tool_call>', 9),
        ('\n<tool_call>{"name": "set_timer", ', 6),
        ('"arguments": {"seconds": 300}}</tool_call>', 7),
        ("<tool_call>not json</tool_call>", 5),
    ]
    events = read(CallReader(tool_request()), pieces)
    answer = "".join(e.text for e in events if isinstance(e, TokenText))
    assert answer == "Let me check. "
    assert sum(e.tokens for e in events if isinstance(e, TokenText)) == 30
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, json.loads(c.arguments) if not c.error else c.arguments) for c in calls] == [
        ("get_time", {}),
        ("set_timer", {"seconds": 300}),
        ("", "not json"),
    ]
    assert "not a call" in calls[2].error


def test_constrained_answers_are_read_as_calls_at_the_end():
    named = read(
        CallReader(tool_request(ToolChoiceMode.NAMED, "set_timer")),
        [('{"seconds"', 2), (": 5}", 2)],
    )
    assert named[:2] == [TokenText("", 2), TokenText("", 2)]
    assert [(c.name, c.arguments) for c in named[2:]] == [("set_timer", '{"seconds": 5}')]
    required = read(
        CallReader(tool_request(ToolChoiceMode.REQUIRED)),
        [('[{"name": "get_time", "arguments": {}}, ', 9), ('{"name": "set_timer", "argu', 6)],
    )
    (cut_off,) = [e for e in required if isinstance(e, ToolCall)]
    assert cut_off.error and cut_off.arguments.startswith('[{"name"')


def test_without_tools_the_text_is_all_answer():
    reader = CallReader(GenerationRequest("t", (ChatTurn("user", "Hi"),), Sampling()))
    assert read(reader, [("<tool_call>{}</tool_call>", 3)]) == [
        TokenText("<tool_call>{}</tool_call>", 3)
    ]


class TokenizerDouble:
    """A chat template that writes the messages and tools as JSON (4 characters a token)."""

    def __init__(self) -> None:
        self.rendered: list[dict[str, Any]] = []

    def apply_chat_template(self, messages, tools=None, tokenize=True, **kwargs):
        self.rendered.append({"messages": messages, "tools": tools, **kwargs})
        text = json.dumps({"messages": messages, "tools": tools})
        return list(range(len(text) // 4)) if tokenize else text


class EngineDouble:
    """vLLM's AsyncLLM for one scripted answer per request: (text, tokens) deltas, then stop."""

    def __init__(self, *scripts: list[tuple[str, int]]) -> None:
        self.scripts = list(scripts)
        self.model_config = SimpleNamespace(max_model_len=4096)
        self.params: list[Any] = []

    async def generate(self, prompt, params, request_id) -> AsyncIterator[Any]:
        self.params.append(params)
        script = self.scripts.pop(0)
        for i, (text, tokens) in enumerate(script):
            reason = "stop" if i == len(script) - 1 else None
            completion = SimpleNamespace(text=text, token_ids=[0] * tokens, finish_reason=reason)
            yield SimpleNamespace(num_cached_tokens=None, outputs=[completion])

    async def abort(self, request_id: str) -> None:
        pass

    def shutdown(self) -> None:
        pass


class DoubledVllmLlmBackend(VllmLlmBackend):
    """The vllm backend itself, with its engine, tokenizer and vLLM's classes as doubles."""

    def __init__(self, engine: EngineDouble) -> None:
        super().__init__("org/Tool-Model")
        self.engine = engine
        self.tokenizer = TokenizerDouble()

    async def load(self) -> None:
        self.attach(self.engine, self.tokenizer, VllmApi(SimpleNamespace, SimpleNamespace, "delta"))


CALLING = [
    ("Let me check.", 4),
    (' <tool_call>{"name": "get_time", "arguments": {}}</tool_call>', 12),
    ('<tool_call>{"name": "set_timer", "arguments": {"seconds": 300}}', 14),
    ("</tool_call>", 1),
]


async def test_hermes_calls_over_grpc_with_the_tools_in_the_template():
    backend = DoubledVllmLlmBackend(EngineDouble(CALLING, [('{"seconds": 60}', 6)]))
    settings = LlmSettings(port=0, max_streams=2, shutdown_grace_s=0.5)
    tools = [
        llm_pb2.Tool(name="get_time", description="The current local time."),
        llm_pb2.Tool(name="set_timer", parameters_json=json.dumps(TIMER_SCHEMA)),
    ]

    def start(choice: llm_pb2.ToolChoice | None = None) -> llm_pb2.GenerateChunksRequest:
        return llm_pb2.GenerateChunksRequest(
            start=llm_pb2.StartGeneration(
                messages=[llm_pb2.ChatMessage(role="user", content="Time? And a timer.")],
                chunking=llm_pb2.ChunkingPolicy(first_chunk_min_tokens=1),
                tools=tools,
                tool_choice=choice,
            )
        )

    async with running(LlmService(settings, backend)) as server, channel_to(server) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        responses = await read_all(stub.GenerateChunks(iter([start()])))
        kinds = [r.WhichOneof("response") for r in responses]
        assert kinds == ["chunk", "tool_call", "tool_call", "done"]
        assert responses[0].chunk.text.strip() == "Let me check."
        calls = [r.tool_call for r in responses if r.HasField("tool_call")]
        assert [(c.name, json.loads(c.arguments_json), c.error) for c in calls] == [
            ("get_time", {}, ""),
            ("set_timer", {"seconds": 300}, ""),
        ]
        done = responses[-1].done
        assert done.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
        assert done.usage.completion_tokens == 31
        assert backend.tokenizer.rendered[-1]["tools"][1] == {
            "type": "function",
            "function": {"name": "set_timer", "parameters": TIMER_SCHEMA},
        }
        assert not hasattr(backend.engine.params[-1], "structured_outputs")

        named = llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NAMED, name="set_timer")
        responses = await read_all(stub.GenerateChunks(iter([start(named)])))
        assert [r.WhichOneof("response") for r in responses] == ["tool_call", "done"]
        assert responses[0].tool_call.name == "set_timer"
        assert responses[0].tool_call.arguments_json == '{"seconds": 60}'
        params = backend.engine.params[-1]
        assert params.structured_outputs.json == TIMER_SCHEMA
        assert params.output_kind == "delta"
        assert [t["function"]["name"] for t in backend.tokenizer.rendered[-1]["tools"]] == [
            "set_timer"
        ]


@pytest.mark.gpu
async def test_the_engine_generates_where_vllm_and_a_gpu_are():
    pytest.importorskip("vllm", reason="needs the vllm extra (GPU only)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = os.environ.get("NEMOTRON_TEST_VLLM_MODEL", "")
    if not model:
        pytest.skip("set NEMOTRON_TEST_VLLM_MODEL to a local model folder (no hub access in tests)")
    from services.llm.backend import ChatTurn, GenerationRequest

    backend = VllmLlmBackend(model, context_window=2048)
    await backend.load()
    try:
        stats = GenerationStats()
        request = GenerationRequest("t", (ChatTurn("user", "Hi"),), Sampling(max_tokens=8))
        async for event in backend.generate(request):
            stats.record(event)
        assert stats.completion_tokens >= 1
    finally:
        await backend.aclose()

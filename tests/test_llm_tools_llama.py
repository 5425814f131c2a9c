"""Tool calls with llama_cpp: a grammar makes every call valid; prompts teach the format.

The grammar and call tracking are tested on their own; the rest with the real SmolLM2-135M over
real gRPC. A 135M model is no agent: what is checked is that whatever it writes in a call is
valid (names, schemas), that calls never reach speech, and that the history renders.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jsonschema
import pytest

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backend import ChatTurn, GenerationRequest, Sampling, TokenText
from services.llm.backends.llama_calls import ToolCalls
from services.llm.backends.llama_cpp import LlamaCppLlmBackend, _Decoding
from services.llm.backends.llama_engine import GrammarError
from services.llm.backends.llama_prompt import ChatPrompt, RenderedPrompt
from services.llm.backends.llama_tools import integer_range, parser_of, tool_grammar
from services.llm.reasoning import Reasoning
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.llm.tools import Tool, ToolCall, ToolChoice, ToolChoiceMode
from services.runtime.errors import InvalidArgument
from tests.helpers import field_violation, read_all, read_rest
from tests.servers import channel_to, running

Req = llm_pb2.GenerateChunksRequest
TIMER_SCHEMA = {
    "type": "object",
    "properties": {"seconds": {"type": "integer", "minimum": 1}},
    "required": ["seconds"],
}
TIMER = Tool("set_timer", "Start a countdown timer.", TIMER_SCHEMA)
CLOCK = Tool("get_time", "The current local time.")
NOTE = Tool(
    "take_note",
    "Write a note down.",
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
)
# Valid JSON Schema that llama-cpp-python's converter cannot turn into a grammar.
UNCONVERTIBLE = {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}
GREEDY = llm_pb2.SamplingParams(temperature=0.0, max_tokens=60)
# Random tokens inside the grammar: calls with random notes, one after another, until cancelled.
ENDLESS = llm_pb2.SamplingParams(temperature=2.0, top_k=0, top_p=1.0, max_tokens=800, seed=7)
MODES = {
    "auto": llm_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": llm_pb2.TOOL_CHOICE_MODE_NONE,
    "required": llm_pb2.TOOL_CHOICE_MODE_REQUIRED,
    "named": llm_pb2.TOOL_CHOICE_MODE_NAMED,
}


# ---- the grammar, on its own ----------------------------------------------------------------


def _regex(gbnf: str) -> str:
    """A Python regex for the GBNF subset integer_range writes (literals, classes, groups)."""
    parts = []
    for token in re.findall(r'"(?:\\.|[^"\\])*"|\[[^\]]*\]|[()|?*]', gbnf):
        parts.append(re.escape(json.loads(token)) if token.startswith('"') else token)
    return "".join(parts)


@pytest.mark.parametrize(
    ("low", "high"),
    [(1, None), (0, None), (None, None), (-5, 5), (7, 1234), (-1234, -7), (13, 13), (99, 1000)],
)
def test_integer_ranges_take_exactly_the_integers_between_their_bounds(low, high):
    pattern = re.compile(_regex(integer_range(low, high)))
    for number in [*range(-1500, 1500), 10**15, -(10**15)]:
        inside = (low is None or number >= low) and (high is None or number <= high)
        assert bool(pattern.fullmatch(str(number))) == inside, number
    assert not pattern.fullmatch("01") and not pattern.fullmatch("-0")


def test_the_grammar_names_each_tool_and_continues_after_what_the_tag_token_wrote():
    grammar = tool_grammar((CLOCK, TIMER), (0, 1))
    assert '"get_time\\", \\"arguments\\": " tool0-root' in grammar.rules
    assert "tool1-seconds ::=" in grammar.rules  # each tool's rules apart, by prefix
    assert grammar.gbnf().startswith('root ::= [ \\n]? "{\\"name\\": \\"" call-rest')
    assert grammar.gbnf('\n{"na').startswith('root ::= "me\\": \\"" call-rest')
    assert grammar.accepts(' {"') and not grammar.accepts("<")


def test_a_schema_the_converter_cannot_take_is_invalid_for_that_tool():
    with pytest.raises(InvalidArgument) as caught:
        tool_grammar((CLOCK, Tool("odd", "", UNCONVERTIBLE)), (0, 3))
    assert caught.value.field == "start.tools[3].parameters_json"


class _Pieces:
    """A model whose token i is the text pieces[i]."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def piece(self, token: int) -> bytes:
        return self.pieces[token].encode()


def _decode(pieces: list[str], stop: tuple[str, ...] = ()) -> tuple[list, list[str]]:
    """Run the decoding of scripted tokens; returns its events and the grammars it switched to."""
    calls = ToolCalls(tool_grammar((CLOCK, TIMER), (0, 1)), opened=False)
    sampling = Sampling(max_tokens=100, stop=stop)
    prompt = RenderedPrompt([0] * 10, starts_in_reasoning=False)
    decoding = _Decoding(_Pieces(pieces), prompt, sampling, 1000, Reasoning(), calls)
    events, grammars = [], []
    for token in range(len(pieces)):
        events += decoding.events(token)
        if grammar := decoding.grammar_switch():
            grammars.append(grammar)
    return events + decoding.rest(), grammars


def test_auto_speaks_the_answer_then_switches_to_the_grammar_where_the_call_opens():
    pieces = ["Sure", ".", " <", "tool", "_", "call", '>{"', 'name": "set_timer", ', '"arguments"']
    pieces += [': {"seconds": 300}}', "</", "tool_call>"]
    events, grammars = _decode(pieces)
    text = [e for e in events if isinstance(e, TokenText)]
    assert "".join(e.text for e in text) == "Sure. "
    assert sum(e.tokens for e in text) == len(pieces)  # the call's tokens count, unspoken
    # The grammar continues after what the tag's token already wrote ('{"').
    assert len(grammars) == 1 and grammars[0].startswith('root ::= "name\\": \\"" call-rest')
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("set_timer", {"seconds": 300})]
    assert events[-1] is calls[-1]  # calls come after the answer text


def test_a_tag_token_that_runs_on_into_no_call_starts_the_call_afresh():
    pieces = ["<tool_call", "><", '{"name": "get_time", "arguments": {}}', "</tool_call>"]
    events, grammars = _decode(pieces)
    assert grammars[0].startswith('root ::= [ \\n]? "{\\"name\\": \\""')
    assert [e.name for e in events if isinstance(e, ToolCall)] == ["get_time"]


def test_stop_strings_end_the_answer_but_never_see_a_call():
    call = ['{"name": "get_time", "arguments": {}}', "</tool_call>"]
    events, _ = _decode(["OK", " <tool_call>", *call], stop=("get_time",))
    assert "".join(e.text for e in events if isinstance(e, TokenText)) == "OK "
    assert [e.name for e in events if isinstance(e, ToolCall)] == ["get_time"]
    events, _ = _decode(["Done. END", " <tool_call>"], stop=("END",))
    assert "".join(e.text for e in events if isinstance(e, TokenText)) == "Done. "


def test_a_call_cut_by_max_tokens_is_dropped():
    events, _ = _decode(["OK", " <tool_call>", '{"name": "get_time", "arguments": {'])
    assert "".join(e.text for e in events if isinstance(e, TokenText)) == "OK "
    assert not [e for e in events if isinstance(e, ToolCall)]


def test_a_repeated_call_ends_the_turn():
    calls = ToolCalls(tool_grammar((CLOCK,), (0,)), opened=True)
    call = '{"name": "get_time", "arguments": {}}</tool_call>'
    calls.add_call_text(call + "\n<tool_call>")
    assert not calls.repeated
    calls.add_call_text(call.replace(": {}", ":{}"))
    assert calls.repeated and len(calls.made()) == 1


# ---- prompts --------------------------------------------------------------------------------

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for tool in tools %} "
    "{{ tool.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{% for call in message.tool_calls or [] %}CALL {{ call.id }} {{ call.function.name }} "
    "{{ call.function.arguments | tojson }}{% endfor %}"
    "{% if message.tool_call_id %}RESULT OF {{ message.tool_call_id }} FROM {{ message.name }}"
    "{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking %}<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
HISTORY = (
    ChatTurn("system", "Be brief."),
    ChatTurn("user", "What time is it?"),
    ChatTurn("assistant", "Let me look.", (ToolCall("call_1", "get_time", "{}"),)),
    ChatTurn("tool", "14:05", tool_call_id="call_1"),
)


@pytest.fixture
def backend() -> LlamaCppLlmBackend:
    return LlamaCppLlmBackend(slots=1, context_window=1024, threads=2, extra_buffers="off")


@pytest.fixture
async def llama(backend: LlamaCppLlmBackend) -> AsyncIterator[LlamaCppLlmBackend]:
    await backend.load()
    yield backend
    await backend.aclose()


def _text(backend: LlamaCppLlmBackend, prompt: ChatPrompt, *args) -> str:
    rendered = prompt.render(*args)
    assert backend.model is not None
    return backend.model.detokenize(rendered.tokens, special=True).decode()


@pytest.mark.slow
async def test_chatml_gets_the_format_in_the_system_prompt_and_calls_as_text(llama):
    prompt = ChatPrompt(llama.model)
    text = _text(llama, prompt, HISTORY, Reasoning(), (CLOCK, TIMER))
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools:")
    assert '"name": "set_timer"' in system
    assert (
        '<|im_start|>assistant\nLet me look.\n<tool_call>{"name": "get_time", "arguments": {}}'
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n14:05\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    ) in text
    # Without tools offered (NONE) the history still renders, without the instruction.
    plain = _text(llama, prompt, HISTORY, Reasoning())
    assert "You can call" not in plain and "<tool_response>\n14:05" in plain
    # The model must not write the result markup itself: it ends the answer.
    assert prompt.render(HISTORY, Reasoning()).stops == ("<tool_response>", "</tool_response>")
    assert prompt.render(HISTORY[:2], Reasoning()).stops == ()
    # REQUIRED / NAMED: the prompt opens the call.
    assert _text(llama, prompt, HISTORY[:2], Reasoning(), (CLOCK,), True).endswith(
        "<|im_start|>assistant\n<tool_call>"
    )


@pytest.mark.slow
async def test_a_template_that_takes_tools_gets_them_and_the_calls(llama, tmp_path: Path):
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    prompt = ChatPrompt(llama.model, str(template))
    history = (
        ChatTurn("user", "Set a tea timer."),
        ChatTurn("assistant", "Sure.", (ToolCall("call_1", "set_timer", '{"seconds": 300}'),)),
        ChatTurn("tool", "started", tool_call_id="call_1"),
    )
    text = _text(llama, prompt, history, Reasoning(), (CLOCK, TIMER))
    assert text.startswith("<|im_start|>system\nTOOLS: get_time set_timer<|im_end|>")
    # The arguments reach the template as an object (templates write them with tojson), not
    # as a JSON string that tojson would encode a second time.
    assert 'Sure.CALL call_1 set_timer {"seconds": 300}<|im_end|>' in text
    assert "<|im_start|>tool\nstartedRESULT OF call_1 FROM set_timer<|im_end|>" in text
    assert "You can call" not in text


@pytest.mark.slow
async def test_a_forced_call_comes_after_the_empty_think_block(llama, tmp_path: Path):
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    prompt = ChatPrompt(llama.model, str(template))
    text = _text(llama, prompt, HISTORY[:2], Reasoning(), (CLOCK,), True)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>")


# ---- the engine -----------------------------------------------------------------------------

SCHEMAS = [
    # A pattern is left to the servicer's check (the converter's regexes miss \d and escapes).
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "\\d{3}-\\d+"}}},
    # Two tools' $defs of one name stay apart.
    {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/x"}},
        "$defs": {"x": {"type": "integer"}},
    },
    {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/x"}},
        "$defs": {"x": {"type": "string"}},
    },
    {
        "type": "object",
        "properties": {"child": {"$ref": "#/$defs/node"}},
        "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}}},
    },
    {
        "type": "object",
        "properties": {
            "unit": {"enum": ["s", "min", None]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "level": {"type": "integer", "minimum": -3, "exclusiveMaximum": 11},
            "ratio": {"type": ["number", "null"], "minimum": 0},
        },
        "required": ["unit"],
    },
]


@pytest.mark.slow
async def test_grammars_of_all_kinds_of_schemas_parse_in_llama_cpp(llama):
    tools = tuple(Tool(f"t{i}", "", schema) for i, schema in enumerate(SCHEMAS))
    parses = parser_of(llama.model.vocab)
    grammar = tool_grammar(tools, tuple(range(len(tools))), parses)
    assert parses(grammar.gbnf()) and parses(grammar.gbnf(' {"name": "t'))
    assert not parses("root ::= undefined-rule")


@pytest.mark.slow
async def test_a_grammar_llama_cpp_cannot_parse_changes_nothing(llama):
    engine = llama.engine
    prompt = llama.encode((ChatTurn("user", "Hi"),))
    with pytest.raises(GrammarError):
        await engine.begin(0, prompt, Sampling(temperature=0.0), "root ::= undefined-rule")
    await engine.begin(0, prompt, Sampling(temperature=0.0), 'root ::= "Yes" | "No"')
    with pytest.raises(GrammarError):
        await engine.constrain(0, "root ::= root")
    # The sequence still decodes under the grammar it had.
    first = llama.model.piece(await engine.next_token(0)).decode()
    assert first and ("Yes".startswith(first) or "No".startswith(first))
    engine.end(0)


# ---- over gRPC ------------------------------------------------------------------------------


def _proto(tool: Tool) -> llm_pb2.Tool:
    return llm_pb2.Tool(
        name=tool.name, description=tool.description, parameters_json=json.dumps(tool.parameters)
    )


def start(
    messages: list[llm_pb2.ChatMessage],
    mode: str = "auto",
    name: str = "",
    tools: tuple[Tool, ...] = (CLOCK, TIMER),
    sampling: llm_pb2.SamplingParams = GREEDY,
) -> Req:
    return Req(
        start=llm_pb2.StartGeneration(
            messages=messages,
            sampling=sampling,
            chunking=llm_pb2.ChunkingPolicy(first_chunk_min_tokens=1),
            tools=[_proto(tool) for tool in tools],
            tool_choice=llm_pb2.ToolChoice(mode=MODES[mode], name=name),
        )
    )


def user(text: str) -> llm_pb2.ChatMessage:
    return llm_pb2.ChatMessage(role="user", content=text)


@pytest.fixture
async def stub(backend) -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    # The server loads the backend, and closes it.
    settings = LlmSettings(port=0, max_streams=4, shutdown_grace_s=0.5)
    async with running(LlmService(settings, backend)) as server, channel_to(server) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


def _calls(responses: list) -> list[llm_pb2.ToolCall]:
    return [r.tool_call for r in responses if r.HasField("tool_call")]


def _spoken(responses: list) -> str:
    return "".join(r.chunk.text for r in responses if r.HasField("chunk"))


@pytest.mark.slow
async def test_required_makes_valid_calls_and_nothing_spoken(stub):
    responses = await read_all(
        stub.GenerateChunks(iter([start([user("Set a timer.")], "required")]))
    )
    calls = _calls(responses)
    assert calls, "a call is required"
    schemas = {"get_time": CLOCK.parameters, "set_timer": TIMER_SCHEMA}
    for call in calls:
        assert call.error == "" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments_json), schemas[call.name])
    assert "<tool_call>" not in _spoken(responses)
    done = responses[-1].done
    assert done.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    assert 0 < done.usage.completion_tokens <= 60


@pytest.mark.slow
async def test_named_calls_that_tool(stub):
    request = start([user("What time is it?")], "named", "set_timer")
    responses = await read_all(stub.GenerateChunks(iter([request])))
    calls = _calls(responses)
    assert calls and all(call.name == "set_timer" for call in calls)
    seconds = json.loads(calls[0].arguments_json)["seconds"]
    assert isinstance(seconds, int) and seconds >= 1
    assert responses[-1].done.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS


@pytest.mark.slow
async def test_auto_switches_to_the_grammar_once_the_model_opens_a_call(stub, backend):
    grammars: list[str] = []
    constrain = backend.engine.constrain

    async def spy(seq_id: int, grammar: str) -> None:
        grammars.append(grammar)
        await constrain(seq_id, grammar)

    backend.engine.constrain = spy
    # The model copies the call, but the grammar holds it to the schema (seconds >= 1).
    bad = '<tool_call>{"name": "set_timer", "arguments": {"seconds": 0}}</tool_call>'
    responses = await read_all(
        stub.GenerateChunks(iter([start([user(f"Repeat after me: {bad}")])]))
    )
    assert len(grammars) == 1
    calls = _calls(responses)
    assert [c.name for c in calls] == ["set_timer"]
    assert json.loads(calls[0].arguments_json)["seconds"] >= 1 and not calls[0].error
    assert "<tool_call>" not in _spoken(responses)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "auto"])
async def test_a_call_and_its_result_render_and_the_answer_is_spoken(stub, mode):
    messages = [
        user("What time is it?"),
        llm_pb2.ChatMessage(
            role="assistant",
            tool_calls=[llm_pb2.ToolCall(id="call_1", name="get_time", arguments_json="{}")],
        ),
        llm_pb2.ChatMessage(role="tool", tool_call_id="call_1", content="14:05"),
    ]
    responses = await read_all(stub.GenerateChunks(iter([start(messages, mode)])))
    spoken = _spoken(responses)
    assert spoken.strip(), "the model said nothing"
    assert "tool_call" not in spoken and "tool_response" not in spoken
    assert not _calls(responses)
    assert responses[-1].done.finish_reason in (
        llm_pb2.FINISH_REASON_STOP,
        llm_pb2.FINISH_REASON_LENGTH,
    )


@pytest.mark.slow
async def test_a_schema_the_grammar_cannot_express_is_invalid_argument(stub):
    odd = Tool("odd", "", UNCONVERTIBLE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(stub.GenerateChunks(iter([start([user("Hi")], tools=(CLOCK, odd))])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violation(caught.value) == "start.tools[1].parameters_json"


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_cancel_inside_a_constrained_call_frees_the_sequence(stub, backend):
    tokens, inside = 0, asyncio.Event()
    next_token = backend.engine.next_token

    async def counting(seq_id: int) -> int:
        nonlocal tokens
        tokens += 1
        if tokens == 5:
            inside.set()
        return await next_token(seq_id)

    backend.engine.next_token = counting
    call = stub.GenerateChunks()
    await call.write(start([user("Note this.")], "required", tools=(NOTE,), sampling=ENDLESS))
    await asyncio.wait_for(inside.wait(), 30)  # in the call: random notes, call after call
    await call.write(Req(cancel=llm_pb2.CancelGeneration()))
    rest = await read_rest(call)
    assert rest[-1].done.finish_reason == llm_pb2.FINISH_REASON_CANCELLED
    assert backend.pool.free == backend.slot_count
    # The one sequence serves the next constrained request at once.
    responses = await read_all(
        stub.GenerateChunks(iter([start([user("Set a timer.")], "named", "set_timer")]))
    )
    assert [c.name for c in _calls(responses)][:1] == ["set_timer"]
    assert responses[-1].done.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS


@pytest.mark.slow
async def test_a_grammar_holds_only_its_own_sequence_in_a_batch():
    backend = LlamaCppLlmBackend(slots=2, context_window=1024, threads=2, extra_buffers="off")
    await backend.load()
    try:
        messages = (ChatTurn("user", "Set a timer for a minute."),)
        sampling = Sampling(temperature=0.0, max_tokens=40)
        named = ToolChoice(ToolChoiceMode.NAMED, "set_timer")
        forced = GenerationRequest("a", messages, sampling, tools=(TIMER,), tool_choice=named)
        free = GenerationRequest("b", messages, sampling)

        async def run(request: GenerationRequest) -> list:
            return [event async for event in backend.generate(request)]

        constrained, plain = await asyncio.gather(run(forced), run(free))
        assert backend.engine.widest_step == 2  # decoded together
        assert [e.name for e in constrained if isinstance(e, ToolCall)][:1] == ["set_timer"]
        assert not [e for e in plain if isinstance(e, ToolCall)]
        assert "".join(e.text for e in plain if isinstance(e, TokenText)).strip()
    finally:
        await backend.aclose()

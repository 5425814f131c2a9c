"""Reasoning kept out of speech: the think-tag splitter, the contract over gRPC, llama_cpp."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backend import (
    ChatTurn,
    GenerationRequest,
)
from services.llm.backends.llama_cpp import LlamaCppLlmBackend
from services.llm.backends.pieces import piece_events, text_events
from services.llm.reasoning import Piece, Reasoning, ThinkSplitter
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from tests.doubles import ThinkingLlmBackendDouble
from tests.helpers import field_violation, read_all
from tests.servers import channel_to, running

Req = llm_pb2.GenerateChunksRequest


def split(tokens: list[str], inside: bool = False) -> tuple[str, str]:
    splitter = ThinkSplitter(inside=inside)
    pieces = [p for token in tokens for p in splitter.push(token)] + splitter.flush()
    reasoning = "".join(p.text for p in pieces if p.reasoning)
    answer = "".join(p.text for p in pieces if not p.reasoning)
    return reasoning, answer


@pytest.mark.parametrize(
    ("tokens", "inside", "expected"),
    [
        (["<think>", "Hmm.", "</think>", "\n\nYes."], False, ("Hmm.", "Yes.")),
        # Tags split across tokens, in every place.
        (["<th", "ink>Hm", "m.</", "thi", "nk>", "\n\nYe", "s."], False, ("Hmm.", "Yes.")),
        (["<", "t", "h", "i", "n", "k", ">", "a", "<", "/", "think", ">", "b"], False, ("a", "b")),
        # The template opened the block: only the closing tag comes.
        (["Let me see", ".</think>", "\n\nNine."], True, ("Let me see.", "Nine.")),
        # No reasoning at all; a "<" that begins no tag is answer text.
        (["1 <", " 2 and <b>", " x"], False, ("", "1 < 2 and <b> x")),
        # Unclosed at the end (max_tokens): all of it is reasoning, none of it is spoken.
        (["<think>", "still thinking", " <"], False, ("still thinking <", "")),
        # Text before the block stays answer.
        (["Sure. <think>", "why", "</think>Because."], False, ("why", "Sure. Because.")),
    ],
)
def test_the_splitter_cuts_think_blocks_out_of_any_token_stream(tokens, inside, expected):
    assert split(tokens, inside) == expected


def test_a_budget_closes_the_reasoning_with_what_was_held():
    splitter = ThinkSplitter(inside=True)
    assert splitter.push("plan: a </th") == [Piece("plan: a ", True)]
    assert splitter.close_reasoning() == [Piece("</th", True)]
    assert not splitter.inside and splitter.push("Answer.") == [Piece("Answer.", False)]


def test_tokens_count_with_their_first_piece_and_tag_tokens_with_the_side_they_began():
    splitter = ThinkSplitter()
    assert text_events(splitter, "<think>", 1)[0].tokens == 1
    events = text_events(splitter, "a</think>b", 1)
    assert [(type(e).__name__, e.text, e.tokens) for e in events] == [
        ("ReasoningText", "a", 1),
        ("TokenText", "b", 0),
    ]
    assert piece_events([], 2, inside=True)[0].tokens == 2


def start(mode: int = llm_pb2.REASONING_MODE_ON, budget: int = 0) -> Req:
    return Req(
        start=llm_pb2.StartGeneration(
            messages=[llm_pb2.ChatMessage(role="user", content="Pick a number.")],
            sampling=llm_pb2.SamplingParams(temperature=0.0, max_tokens=40),
            chunking=llm_pb2.ChunkingPolicy(first_chunk_min_tokens=1),
            reasoning=llm_pb2.ReasoningConfig(mode=mode, budget_tokens=budget),
        )
    )


@pytest.fixture
async def stub() -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    settings = LlmSettings(port=0, max_streams=4, shutdown_grace_s=0.5)
    async with running(LlmService(settings, ThinkingLlmBackendDouble())) as server:
        async with channel_to(server) as channel:
            yield llm_pb2_grpc.LlmServiceStub(channel)


async def test_reasoning_streams_apart_and_only_the_answer_is_chunked(stub):
    responses = await read_all(stub.GenerateChunks(iter([start()])))
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[-1] == "done" and "reasoning" in kinds and "chunk" in kinds
    # All reasoning comes before the first chunk, as the model produced it.
    assert kinds.index("chunk") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    reasoning = "".join(r.reasoning.text for r in responses if r.HasField("reasoning"))
    answer = "".join(r.chunk.text for r in responses if r.HasField("chunk"))
    assert reasoning == "The user wants a number."
    assert answer == "Seven. Done."
    usage = responses[-1].done.usage
    assert usage.completion_tokens == len(ThinkingLlmBackendDouble.TOKENS)
    reasoning_tokens = sum(r.reasoning.token_count for r in responses if r.HasField("reasoning"))
    chunk_tokens = sum(r.chunk.token_count for r in responses if r.HasField("chunk"))
    assert usage.reasoning_tokens == reasoning_tokens
    assert reasoning_tokens + chunk_tokens == usage.completion_tokens


async def test_a_reasoning_mode_the_server_does_not_know_is_invalid(stub):
    import grpc

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(stub.GenerateChunks(iter([start(mode=7)])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violation(caught.value) == "start.reasoning.mode"


# ---- the real llama_cpp backend, with a chat template that takes enable_thinking --------------

THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking %}<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture
async def llama(tmp_path: Path) -> AsyncIterator[LlamaCppLlmBackend]:
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    backend = LlamaCppLlmBackend(
        slots=1, context_window=512, threads=2, extra_buffers="off", chat_template=str(template)
    )
    await backend.load()
    yield backend
    await backend.aclose()


@pytest.mark.slow
async def test_llama_cpp_switches_reasoning_with_the_templates_enable_thinking(llama):
    messages = (ChatTurn("user", "What is two plus two?"),)
    on = llama.render(messages, Reasoning(enabled=True))
    off = llama.render(messages, Reasoning(enabled=False))
    assert on.starts_in_reasoning and not off.starts_in_reasoning
    text = llama.model.detokenize(off.tokens, special=True).decode()
    assert text.endswith("<think>\n\n</think>\n\n")


@pytest.mark.slow
async def test_llama_cpp_closes_reasoning_at_its_budget_and_then_answers(llama):
    settings = LlmSettings(port=0, max_streams=2, shutdown_grace_s=0.5)
    async with running(LlmService(settings, llama)) as server, channel_to(server) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        responses = await read_all(stub.GenerateChunks(iter([start(budget=6)])))
        deltas = [r.reasoning for r in responses if r.HasField("reasoning")]
        chunks = [r.chunk for r in responses if r.HasField("chunk")]
        usage = responses[-1].done.usage
        assert sum(d.token_count for d in deltas) == usage.reasoning_tokens == 6
        assert chunks, "after the budget the model answers"
        assert usage.completion_tokens == 6 + sum(c.token_count for c in chunks)
        assert all("</think>" not in c.text and "<think>" not in c.text for c in chunks)

        off = await read_all(stub.GenerateChunks(iter([start(mode=llm_pb2.REASONING_MODE_OFF)])))
        assert not any(r.HasField("reasoning") for r in off)
        assert off[-1].done.usage.reasoning_tokens == 0


def test_upstream_reasoning_comes_apart_in_its_own_field_or_in_tags():
    from services.llm.backend import ReasoningText, Sampling, TokenText
    from services.llm.backends.openai_upstream import events_of, request_body

    separate = {"choices": [{"delta": {"reasoning_content": "Think.", "content": None}}]}
    assert events_of(separate, ThinkSplitter()) == [ReasoningText("Think.")]
    splitter = ThinkSplitter()
    tagged = [
        events_of({"choices": [{"delta": {"content": text}}]}, splitter)
        for text in ("<think>Hm", "</think>", "Yes.")
    ]
    assert [e for events in tagged for e in events if e.text] == [
        ReasoningText("Hm"),
        TokenText("Yes."),
    ]
    request = GenerationRequest("r", (ChatTurn("user", "Hi"),), Sampling())
    assert request_body("m", request)["chat_template_kwargs"] == {"enable_thinking": False}

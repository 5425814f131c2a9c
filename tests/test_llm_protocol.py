"""LlmService.GenerateChunks over real gRPC, with a scripted test-double backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backend import GenerationEvent, GenerationRequest, TokenText
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from tests.doubles import REPLY, ScriptedLlmBackendDouble
from tests.helpers import field_violation, read_all, read_rest
from tests.servers import channel_to, running

Req = llm_pb2.GenerateChunksRequest


def start(
    messages: list[tuple[str, str]] | None = None,
    wait: bool = False,
    sampling: llm_pb2.SamplingParams | None = None,
    chunking: llm_pb2.ChunkingPolicy | None = None,
) -> Req:
    policy = chunking or llm_pb2.ChunkingPolicy()
    policy.wait_for_continue = wait
    return Req(
        start=llm_pb2.StartGeneration(
            request_id="r1",
            messages=[
                llm_pb2.ChatMessage(role=role, content=content)
                for role, content in (
                    messages if messages is not None else [("system", "Be brief."), ("user", "Hi?")]
                )
            ],
            sampling=sampling,
            chunking=policy,
        )
    )


def cont(index: int) -> Req:
    return Req(continue_generation=llm_pb2.ContinueGeneration(chunk_index=index))


CANCEL = Req(cancel=llm_pb2.CancelGeneration())


async def test_chunks_concatenate_to_the_answer_then_done(llm_stub):
    responses = await read_all(llm_stub.GenerateChunks(iter([start()])))
    chunks = [r.chunk for r in responses[:-1]]
    done = responses[-1].done
    assert "".join(c.text for c in chunks) == REPLY
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # "Sure, I can help with that today." is 7 tokens, under the first chunk minimum of 10.
    assert (
        chunks[0].text
        == "Sure, I can help with that today. The weather in Paris is mild, around 18 degrees. "
    )
    assert all(c.ends_sentence for c in chunks)
    assert done.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert done.usage.completion_tokens == sum(c.token_count for c in chunks) == len(REPLY.split())
    assert done.usage.prompt_tokens == 3
    assert done.chunk_count == len(chunks)
    assert 0 <= done.timing.ttfb_ms <= done.timing.total_ms


async def test_wait_for_continue_holds_generation_until_released(llm_stub, llm_backend):
    call = llm_stub.GenerateChunks()
    await call.write(start(wait=True))
    first = (await call.read()).chunk
    await asyncio.sleep(0.1)
    # One token of look-ahead decides where the chunk ends; nothing more is generated.
    assert llm_backend.tokens_generated == first.token_count + 1
    await call.write(cont(0))
    second = (await call.read()).chunk
    assert second.index == 1
    await asyncio.sleep(0.1)
    assert llm_backend.tokens_generated == first.token_count + second.token_count + 1
    await call.done_writing()  # no more continues can come: the rest is released
    rest = await read_rest(call)
    assert rest[-1].done.finish_reason == llm_pb2.FINISH_REASON_STOP


async def test_cancel_stops_generation_and_ends_with_done(llm_stub, llm_backend):
    llm_backend.token_delay_s = 0.02
    call = llm_stub.GenerateChunks()
    await call.write(start(wait=True))
    await call.read()
    await call.write(CANCEL)
    rest = await read_rest(call)
    assert [r.WhichOneof("response") for r in rest] == ["done"]
    assert rest[0].done.finish_reason == llm_pb2.FINISH_REASON_CANCELLED
    assert llm_backend.closed == 1
    # The next request right after a cancel works.
    llm_backend.token_delay_s = 0.0
    responses = await read_all(llm_stub.GenerateChunks(iter([start()])))
    assert responses[-1].done.finish_reason == llm_pb2.FINISH_REASON_STOP


async def test_cancelling_the_rpc_frees_the_sequence(llm_server, llm_stub, llm_backend):
    llm_backend.token_delay_s = 0.05
    call = llm_stub.GenerateChunks()
    await call.write(start())
    await call.read()
    call.cancel()
    for _ in range(100):
        if llm_backend.closed and llm_server.service.limiter.active == 0:
            break
        await asyncio.sleep(0.01)
    assert llm_backend.closed == 1
    assert llm_server.service.limiter.active == 0


class SplitCharacterLlmBackendDouble(ScriptedLlmBackendDouble):
    """Each word with an accent costs one more token, which has no text of its own.

    As with a real tokenizer whose byte tokens split a UTF-8 character: the backend counts the
    lead byte's token, but its text only arrives with the next token.
    """

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        async for event in super().generate(request):
            if isinstance(event, TokenText) and not event.text.isascii():
                yield TokenText("")
            yield event


async def test_tokens_without_text_of_their_own_count_in_the_chunk_of_their_text():
    reply = "Un caf\u00e9 au lait, s'il vous pla\u00eet, et une cr\u00e8me br\u00fbl\u00e9e. Merci."
    backend = SplitCharacterLlmBackendDouble(reply)
    settings = LlmSettings(port=0, max_streams=4, shutdown_grace_s=0.5)
    async with running(LlmService(settings, backend)) as server, channel_to(server) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        responses = await read_all(stub.GenerateChunks(iter([start(wait=False)])))
    chunks, done = [r.chunk for r in responses[:-1]], responses[-1].done
    assert "".join(c.text for c in chunks) == reply
    words = reply.split()
    expected = len(words) + sum(not word.isascii() for word in words)
    assert done.usage.completion_tokens == expected
    assert sum(c.token_count for c in chunks) == expected


async def test_max_tokens_ends_with_length(llm_stub):
    responses = await read_all(
        llm_stub.GenerateChunks(iter([start(sampling=llm_pb2.SamplingParams(max_tokens=5))]))
    )
    done = responses[-1].done
    assert done.finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert done.usage.completion_tokens == 5
    assert "".join(r.chunk.text for r in responses[:-1]) == "Sure, I can help with"


async def test_continue_for_an_unsent_chunk_is_refused(llm_stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(llm_stub.GenerateChunks(iter([start(wait=True), cont(7)])))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("requests", "code", "field"),
    [
        ([cont(0)], grpc.StatusCode.FAILED_PRECONDITION, None),
        ([CANCEL], grpc.StatusCode.FAILED_PRECONDITION, None),
        ([Req()], grpc.StatusCode.INVALID_ARGUMENT, "request"),
        ([start(wait=True), start()], grpc.StatusCode.FAILED_PRECONDITION, None),
        ([start(wait=True), Req()], grpc.StatusCode.INVALID_ARGUMENT, "request"),
        ([start(messages=[])], grpc.StatusCode.INVALID_ARGUMENT, "start.messages"),
        (
            [start(messages=[("wizard", "hi")])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.messages[0].role",
        ),
        (
            [start(messages=[("user", "  ")])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.messages[0].content",
        ),
        (
            [start(messages=[("user", "x" * 200_001)])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.messages",
        ),
        (
            [start(sampling=llm_pb2.SamplingParams(temperature=9))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.sampling.temperature",
        ),
        (
            [start(sampling=llm_pb2.SamplingParams(temperature=float("nan")))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.sampling.temperature",
        ),
        (
            [start(sampling=llm_pb2.SamplingParams(top_p=0))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.sampling.top_p",
        ),
        (
            [start(sampling=llm_pb2.SamplingParams(max_tokens=0))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.sampling.max_tokens",
        ),
        (
            [start(sampling=llm_pb2.SamplingParams(top_k=100_000))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.sampling.top_k",
        ),
        (
            [start(sampling=llm_pb2.SamplingParams(repetition_penalty=50))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.sampling.repetition_penalty",
        ),
        (
            [start(messages=[("user", "Hi"), ("assistant", "Hello!")])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.messages[1].role",
        ),
        (
            [start(sampling=llm_pb2.SamplingParams(stop=["a"] * 9))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.sampling.stop",
        ),
        (
            [
                start(
                    chunking=llm_pb2.ChunkingPolicy(
                        first_chunk_min_tokens=30, first_chunk_max_tokens=20
                    )
                )
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.chunking.first_chunk_max_tokens",
        ),
    ],
    ids=[
        "continue-first",
        "cancel-first",
        "empty-first",
        "second-start",
        "empty-request",
        "no-messages",
        "unknown-role",
        "empty-content",
        "huge-text",
        "temperature",
        "nan",
        "top-p",
        "max-tokens",
        "top-k",
        "repetition-penalty",
        "assistant-last",
        "stop",
        "chunk-bounds",
    ],
)
async def test_bad_input_gets_the_right_status(llm_stub, requests, code, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(llm_stub.GenerateChunks(iter(requests)))
    assert caught.value.code() == code
    assert caught.value.details()
    assert field_violation(caught.value) == field


async def test_done_waits_for_the_last_continue_so_every_continue_is_valid(llm_stub):
    call = llm_stub.GenerateChunks()
    await call.write(start(wait=True))
    chunks = []
    while True:
        response = await call.read()
        if response.HasField("done"):
            break
        chunks.append(response.chunk)
        if chunks[-1].text.endswith("else?"):  # the last chunk: the call must stay open
            await asyncio.sleep(0.2)
            assert not call.done()
        await call.write(cont(response.chunk.index))
    assert response.done.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert "".join(c.text for c in chunks) == REPLY
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


async def _refused_raw(server, request: bytes) -> pytest.ExceptionInfo[grpc.aio.AioRpcError]:
    """Send `request` as raw bytes (what a generated stub would not let through); the error."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        method = channel.stream_stream(
            "/nemotron.speech.v1.LlmService/GenerateChunks",
            request_serializer=lambda raw: raw,
            response_deserializer=llm_pb2.GenerateChunksResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all(method(iter([request])))
    return caught


async def test_non_utf8_text_is_invalid_argument(llm_server):
    # Proto3 strings must hold UTF-8; a client that writes raw bytes can still send other bytes.
    valid = start(messages=[("user", "XXXX")]).SerializeToString()
    request = valid.replace(b"XXXX", b"\xff\xfe\xfd\xfc")
    caught = await _refused_raw(llm_server, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in caught.value.details()


@pytest.mark.parametrize(
    ("sampling", "said"),
    [
        (llm_pb2.SamplingParams(max_tokens=0), "max_tokens is 0;"),
        (llm_pb2.SamplingParams(top_k=5000), "top_k is 5000;"),
        (llm_pb2.SamplingParams(top_p=1.1), "top_p is 1.1;"),
        (llm_pb2.SamplingParams(repetition_penalty=0.3), "repetition_penalty is 0.3;"),
    ],
    ids=["max-tokens", "top-k", "top-p", "repetition-penalty"],
)
async def test_a_refused_value_is_quoted_as_it_was_sent(llm_stub, sampling, said):
    # Integer fields read as integers (not 0.0), float fields without float32 noise.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(llm_stub.GenerateChunks(iter([start(sampling=sampling)])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(said)


async def test_a_first_request_from_a_newer_client_is_invalid_argument(llm_server):
    # Field 15 is not in this server's oneof: to it the message sets no field, like an empty one.
    unknown_field = bytes([15 << 3 | 0, 0x01])  # field 15, varint, value 1
    assert not Req.FromString(unknown_field).WhichOneof("request")
    caught = await _refused_raw(llm_server, unknown_field)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violation(caught.value) == "request"

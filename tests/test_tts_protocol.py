"""TtsService.Synthesize and ListVoices over real gRPC, with a tone test-double backend."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from nemotron.speech.v1 import tts_pb2
from tests.helpers import field_violation, read_all, read_rest
from tests.tts_messages import BATCH, CANCEL, CLOSE, Req, config, kinds, text


async def test_segments_in_order_with_ids_then_done(tts_stub):
    requests = [config(), text("a", "one two three"), text("b", "four five", BATCH), CLOSE]
    responses = await read_all(tts_stub.Synthesize(iter(requests)))
    created = responses[0].stream_created
    assert created.stream_id.startswith("tts-")
    assert (created.sample_rate_hz, created.voice, created.backend) == (16000, "tone", "double")
    assert kinds(responses) == (
        ["stream_created"]
        + ["audio"] * 3
        + ["segment_complete"]
        + ["audio"]
        + ["segment_complete", "done"]
    )
    audio = [r.audio for r in responses if r.WhichOneof("response") == "audio"]
    assert {a.stream_id for a in audio} == {created.stream_id}
    assert [a.segment_id for a in audio] == ["a", "a", "a", "b"]
    assert [a.sequence for a in audio] == [0, 1, 2, 0]
    completes = [r.segment_complete for r in responses if r.HasField("segment_complete")]
    assert [(c.segment_id, c.audio_ms) for c in completes] == [("a", 300.0), ("b", 200.0)]
    assert completes[0].timing.ttfb_ms <= completes[0].timing.total_ms
    assert sum(len(a.audio) for a in audio) == 2 * 16000 * 500 // 1000
    assert responses[-1].done.total_audio_ms == 500.0


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 48000])
async def test_output_is_resampled_to_the_requested_rate(tts_stub, rate):
    requests = [config(voice="low-tone", rate=rate), text("a", "one two three four"), CLOSE]
    responses = await read_all(tts_stub.Synthesize(iter(requests)))
    assert responses[0].stream_created.sample_rate_hz == rate
    pcm_bytes = sum(len(r.audio.audio) for r in responses if r.HasField("audio"))
    assert pcm_bytes / 2 == pytest.approx(0.4 * rate, abs=4)
    complete = next(r.segment_complete for r in responses if r.HasField("segment_complete"))
    assert complete.audio_ms == pytest.approx(400, abs=1)


async def test_empty_and_unspeakable_text_completes_with_no_audio(tts_stub):
    requests = [config(), text("blank", "   \n\t "), text("emoji", "\U0001f600\u200b"), CLOSE]
    responses = await read_all(tts_stub.Synthesize(iter(requests)))
    assert kinds(responses) == ["stream_created", "segment_complete", "segment_complete", "done"]
    assert all(r.segment_complete.audio_ms == 0 for r in responses[1:3])


async def test_half_close_acts_as_close(tts_stub):
    responses = await read_all(tts_stub.Synthesize(iter([config(), text("a", "hello")])))
    assert kinds(responses)[-1] == "done"


async def test_cancel_drops_queued_and_in_flight_work_and_opens_a_new_stream(tts_stub, tts_backend):
    tts_backend.word_delay_s = 0.05
    call = tts_stub.Synthesize()
    await call.write(config())
    await call.write(text("long", " ".join(["word"] * 40)))
    await call.write(text("queued", "never spoken"))
    first = await call.read()
    old_stream = first.stream_created.stream_id
    while (await call.read()).WhichOneof("response") != "audio":
        pass
    await call.write(CANCEL)
    after_cancel = []
    while True:
        response = await call.read()
        after_cancel.append(response)
        if response.WhichOneof("response") == "cancelled":
            break
    cancelled = after_cancel[-1].cancelled
    assert (cancelled.stream_id, cancelled.dropped_segments) == (old_stream, 2)
    await call.write(text("next", "fresh start"))
    await call.done_writing()
    rest = await read_rest(call)
    assert kinds(rest) == ["stream_created", "audio", "audio", "segment_complete", "done"]
    assert rest[0].stream_created.stream_id != old_stream
    assert all(r.audio.stream_id != old_stream for r in rest if r.HasField("audio"))
    assert "queued" not in {job.text for job in tts_backend.jobs}
    assert tts_backend.active == 0


async def test_cancel_racing_with_audio_never_leaks_audio_after_the_ack(tts_stub, tts_backend):
    for attempt in range(10):
        call = tts_stub.Synthesize()
        await call.write(config())
        await call.write(text(f"s{attempt}", " ".join(["w"] * 30)))
        await asyncio.sleep(0.001 * attempt)
        await call.write(CANCEL)
        await call.done_writing()
        responses = await read_rest(call)
        acked = kinds(responses).index("cancelled")
        assert "audio" not in kinds(responses)[acked:]
        assert kinds(responses)[-1] == "done"


async def test_cancel_with_nothing_open_is_acknowledged(tts_stub):
    responses = await read_all(tts_stub.Synthesize(iter([config(), CANCEL, CLOSE])))
    assert kinds(responses) == ["cancelled", "done"]
    assert responses[0].cancelled.stream_id == ""


async def test_cancelling_the_rpc_stops_synthesis(tts_server, tts_stub, tts_backend):
    tts_backend.word_delay_s = 0.05
    call = tts_stub.Synthesize()
    await call.write(config())
    await call.write(text("a", " ".join(["word"] * 100)))
    await call.read()
    await call.read()
    call.cancel()
    for _ in range(100):
        if tts_backend.active == 0 and tts_server.service.limiter.active == 0:
            break
        await asyncio.sleep(0.01)
    assert tts_backend.active == 0
    assert tts_server.service.limiter.active == 0
    assert tts_backend.closed == 1


async def test_concurrent_calls_are_independent(tts_stub):
    async def one(tag: str) -> list[tts_pb2.SynthesizeResponse]:
        requests = [config(), text(tag, "a b c d"), CLOSE]
        return await read_all(tts_stub.Synthesize(iter(requests)))

    results = await asyncio.gather(*(one(f"seg{i}") for i in range(4)))
    stream_ids = {r[0].stream_created.stream_id for r in results}
    assert len(stream_ids) == 4
    for tag, responses in zip([f"seg{i}" for i in range(4)], results, strict=True):
        assert {r.audio.segment_id for r in responses if r.HasField("audio")} == {tag}


async def test_long_text_is_split_for_the_synthesiser(tts_stub, tts_backend):
    sentence = "This sentence has exactly eight words in it. "
    responses = await read_all(
        tts_stub.Synthesize(iter([config(), text("l", sentence * 30), CLOSE]))
    )
    assert len(tts_backend.jobs) > 1
    assert all(len(job.text) <= 400 for job in tts_backend.jobs)
    complete = next(r.segment_complete for r in responses if r.HasField("segment_complete"))
    assert complete.audio_ms == pytest.approx(240 * 100)


@pytest.mark.parametrize(
    ("requests", "code", "field", "message"),
    [
        ([text("a", "hi")], grpc.StatusCode.FAILED_PRECONDITION, None, "config"),
        ([CANCEL], grpc.StatusCode.FAILED_PRECONDITION, None, "config"),
        ([Req()], grpc.StatusCode.INVALID_ARGUMENT, "request", "send config first"),
        ([config(), config()], grpc.StatusCode.FAILED_PRECONDITION, None, "once"),
        ([config(), Req()], grpc.StatusCode.INVALID_ARGUMENT, "request", "field"),
        (
            [config(voice="nobody")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.voice",
            "tone, low-tone",
        ),
        ([config(language="fr")], grpc.StatusCode.INVALID_ARGUMENT, "config.language", "en"),
        ([config(rate=11025)], grpc.StatusCode.INVALID_ARGUMENT, "config.sample_rate_hz", "48000"),
        ([config(), text("a", "x" * 2001)], grpc.StatusCode.INVALID_ARGUMENT, "text.text", "2000"),
    ],
    ids=[
        "text-first",
        "cancel-first",
        "empty-first",
        "second-config",
        "empty-request",
        "unknown-voice",
        "unknown-language",
        "bad-rate",
        "text-too-long",
    ],
)
async def test_bad_input_gets_the_right_status(tts_stub, requests, code, field, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(tts_stub.Synthesize(iter(requests)))
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert field_violation(caught.value) == field


async def test_too_many_queued_segments_is_resource_exhausted(tts_stub, tts_backend):
    tts_backend.word_delay_s = 1.0
    requests = [config()] + [text(f"s{i}", "slow words here") for i in range(70)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(tts_stub.Synthesize(iter(requests)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_list_voices(tts_stub):
    voices = (await tts_stub.ListVoices(tts_pb2.ListVoicesRequest())).voices
    assert [(v.name, v.is_default, v.sample_rate_hz) for v in voices] == [
        ("tone", True, 16000),
        ("low-tone", False, 22050),
    ]
    german = (await tts_stub.ListVoices(tts_pb2.ListVoicesRequest(language="de-DE"))).voices
    assert [v.name for v in german] == ["low-tone"]


async def test_cancel_while_the_client_is_not_reading_drops_the_backlog(tts_stub, tts_backend):
    tts_backend.word_delay_s = 0.0
    call = tts_stub.Synthesize()
    await call.write(config())
    for index in range(4):  # 400 s of audio, 4,000 chunks
        await call.write(text(f"flood{index}", " ".join(["w"] * 1000)))
    await asyncio.sleep(0.5)  # the server fills every buffer and waits for the reader
    await call.write(CANCEL)
    await call.write(text("next", "after the cancel"))
    await call.done_writing()
    responses = await read_rest(call)
    acked = kinds(responses).index("cancelled")
    old = responses[0].stream_created.stream_id
    # gRPC buffers megabytes for a client that does not read, so a segment or two may be done.
    completed = kinds(responses[:acked]).count("segment_complete")
    assert (responses[acked].cancelled.stream_id, responses[acked].cancelled.dropped_segments) == (
        old,
        4 - completed,
    )
    backlog = [r.audio for r in responses[:acked] if r.HasField("audio")]
    assert {a.stream_id for a in backlog} == {old}
    assert len(backlog) < 4000  # the rest was never made, or made and dropped unsent
    assert kinds(responses)[acked + 1 :] == [
        "stream_created",
        "audio",
        "audio",
        "audio",
        "segment_complete",
        "done",
    ]

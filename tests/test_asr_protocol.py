"""AsrService.StreamingRecognize protocol over real gRPC, with a counting test-double backend."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc
from services.asr.backend import RecognizedWord
from services.asr.servicer import AsrService, measured_stability, stream_words
from services.asr.settings import AsrSettings
from tests.asr_messages import Req, audio, finalize, transcripts
from tests.asr_messages import config as asr_config
from tests.doubles import CountingAsrBackendDouble, LoadGate
from tests.helpers import field_violation, read_all, read_rest, refusal, silence_pcm, tone_pcm
from tests.servers import channel_to, running


def config(rate: int = 16000, interim: bool = True, language: str = "") -> Req:
    """A config with interim results on unless asked (the protocol tests check them)."""
    return asr_config(rate, interim, language)


async def test_ready_then_interims_then_one_final_per_finalize(asr_stub):
    requests = [
        config(),
        *audio(tone_pcm(0.5)),
        finalize("u1"),
        *audio(tone_pcm(0.3)),
        finalize("u2"),
    ]
    responses = await read_all(asr_stub.StreamingRecognize(iter(requests)))
    ready = responses[0].ready
    assert (ready.model, ready.backend, ready.language) == ("counting-double", "double", "en")
    assert ready.session_id.startswith("asr-")
    results = transcripts(responses)
    finals = [t for t in results if t.is_final]
    assert [(t.utterance_id, t.text) for t in finals] == [
        ("u1", "tick tick tick tick tick"),
        ("u2", "tick tick tick"),
    ]
    assert all(t.final_reason == asr_pb2.FINAL_REASON_FINALIZE for t in finals)
    assert (finals[0].audio_start_ms, finals[0].audio_end_ms) == (0, 500)
    assert (finals[1].audio_start_ms, finals[1].audio_end_ms) == (500, 800)
    assert finals[0].stability == 1.0 and finals[0].timing.ttfb_ms >= 0
    interims = [t for t in results if not t.is_final]
    texts = [t.text for t in interims]
    assert texts, "interim results were requested"
    assert all(a != b for a, b in itertools.pairwise(texts)), "only changed text is sent"
    assert all(not t.utterance_id for t in interims)


async def test_no_interims_unless_asked(asr_stub):
    requests = [config(interim=False), *audio(tone_pcm(0.5)), finalize("only")]
    results = transcripts(await read_all(asr_stub.StreamingRecognize(iter(requests))))
    assert [(t.is_final, t.utterance_id) for t in results] == [(True, "only")]


async def test_soft_finalize_answers_at_once_and_is_never_final(asr_stub):
    requests = [
        config(interim=False),
        *audio(tone_pcm(0.3)),
        finalize("s", soft=True),
        *audio(tone_pcm(0.2)),
        finalize("h"),
    ]
    results = transcripts(await read_all(asr_stub.StreamingRecognize(iter(requests))))
    soft, hard = results
    assert (soft.utterance_id, soft.is_final, soft.soft, soft.text) == (
        "s",
        False,
        True,
        "tick tick tick",
    )
    assert soft.final_reason == asr_pb2.FINAL_REASON_UNSPECIFIED
    assert (hard.utterance_id, hard.is_final, hard.soft) == ("h", True, False)
    assert hard.text == "tick tick tick tick tick", "a soft finalize does not end the utterance"


async def test_silence_gives_an_empty_final(asr_stub):
    requests = [config(), *audio(silence_pcm(0.4)), finalize("quiet")]
    results = transcripts(await read_all(asr_stub.StreamingRecognize(iter(requests))))
    assert [(t.text, t.is_final) for t in results if t.is_final] == [("", True)]


async def test_odd_byte_counts_and_empty_chunks_lose_nothing(asr_stub, asr_backend):
    pcm = tone_pcm(0.5)
    pieces = [pcm[i : i + 333] for i in range(0, len(pcm), 333)]  # odd sizes split samples
    requests = [config(interim=False), Req(audio=b"")]
    requests += [Req(audio=p) for p in pieces] + [Req(audio=b""), finalize("u")]
    (final,) = transcripts(await read_all(asr_stub.StreamingRecognize(iter(requests))))
    assert final.text == "tick tick tick tick tick"
    assert asr_backend.samples_seen == 8000


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
async def test_other_sample_rates_are_resampled(asr_stub, asr_backend, rate):
    requests = [config(rate, interim=False), *audio(tone_pcm(1.0, rate), rate), finalize("r")]
    (final,) = transcripts(await read_all(asr_stub.StreamingRecognize(iter(requests))))
    assert final.audio_end_ms == pytest.approx(1000, abs=2)
    assert asr_backend.samples_seen == pytest.approx(16000, abs=32)


async def test_long_utterance_is_finalized_automatically(asr_stub):
    # The fixture caps utterances at 2 s.
    requests = [config(interim=False), *audio(tone_pcm(5.0)), finalize("end")]
    results = transcripts(await read_all(asr_stub.StreamingRecognize(iter(requests))))
    reasons = [t.final_reason for t in results]
    assert reasons == [asr_pb2.FINAL_REASON_MAX_DURATION] * 2 + [asr_pb2.FINAL_REASON_FINALIZE]
    assert [(t.audio_start_ms, t.audio_end_ms) for t in results] == [
        (0, 2000),
        (2000, 4000),
        (4000, 5000),
    ]
    assert [t.utterance_id for t in results] == ["", "", "end"]


async def test_half_close_finalizes_pending_audio(asr_stub):
    requests = [config(interim=False), *audio(tone_pcm(0.3))]
    (final,) = transcripts(await read_all(asr_stub.StreamingRecognize(iter(requests))))
    assert final.is_final and final.final_reason == asr_pb2.FINAL_REASON_END_OF_STREAM


async def test_audio_after_half_close_is_refused_and_pending_audio_is_finalized(asr_stub):
    call = asr_stub.StreamingRecognize()
    await call.write(config(interim=False))
    assert (await call.read()).WhichOneof("response") == "ready"
    for request in audio(tone_pcm(0.3)):
        await call.write(request)
    await call.done_writing()
    # Half-closing ends the request stream (HTTP/2 END_STREAM): nothing more can reach the server.
    with pytest.raises(asyncio.InvalidStateError):
        await call.write(Req(audio=tone_pcm(0.2)))
    (final,) = transcripts(await read_rest(call))
    assert (final.text, final.is_final) == ("tick tick tick", True)
    assert final.final_reason == asr_pb2.FINAL_REASON_END_OF_STREAM
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("requests", "code", "field"),
    [
        ([Req(audio=b"\x00\x00")], grpc.StatusCode.FAILED_PRECONDITION, None),
        ([finalize("x")], grpc.StatusCode.FAILED_PRECONDITION, None),
        ([Req()], grpc.StatusCode.INVALID_ARGUMENT, "request"),
        ([config(), config()], grpc.StatusCode.FAILED_PRECONDITION, None),
        ([config(), Req()], grpc.StatusCode.INVALID_ARGUMENT, "request"),
        ([config(rate=11025)], grpc.StatusCode.INVALID_ARGUMENT, "config.sample_rate_hz"),
        ([config(language="fr")], grpc.StatusCode.INVALID_ARGUMENT, "config.language"),
        ([asr_config(words=True)], grpc.StatusCode.INVALID_ARGUMENT, "config.word_timestamps"),
        (
            [config(), finalize("x" * 200)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "finalize.utterance_id",
        ),
    ],
    ids=[
        "audio-first",
        "finalize-first",
        "empty-first",
        "second-config",
        "empty-request",
        "bad-rate",
        "bad-language",
        "words-from-a-backend-without-them",
        "long-utterance-id",
    ],
)
async def test_protocol_misuse_gets_the_right_status(asr_stub, requests, code, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(asr_stub.StreamingRecognize(iter(requests)))
    assert caught.value.code() == code
    assert caught.value.details()
    assert field_violation(caught.value) == field


async def test_region_tags_match_the_primary_language(asr_stub):
    responses = await read_all(asr_stub.StreamingRecognize(iter([config(language="de-AT")])))
    assert responses[0].ready.language == "de"


async def test_oversized_message_is_refused_and_the_server_lives_on(asr_stub):
    too_big = Req(audio=b"\x00" * (5 * 1024 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(asr_stub.StreamingRecognize(iter([config(), too_big])))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    requests = [config(interim=False), *audio(tone_pcm(0.2)), finalize("after")]
    (final,) = transcripts(await read_all(asr_stub.StreamingRecognize(iter(requests))))
    assert final.utterance_id == "after"


async def test_cancel_midway_frees_the_stream_and_spares_the_others(
    asr_server, asr_stub, asr_backend
):
    doomed = asr_stub.StreamingRecognize()
    await doomed.write(config())
    await doomed.read()
    for chunk in audio(tone_pcm(0.3)):
        await doomed.write(chunk)
    survivor = asr_stub.StreamingRecognize(
        iter([config(interim=False), *audio(tone_pcm(0.4)), finalize("ok")])
    )
    doomed.cancel()
    (final,) = transcripts(await read_all(survivor))
    assert final.text == "tick tick tick tick"
    for _ in range(100):
        if asr_server.service.limiter.active == 0:
            break
        await asyncio.sleep(0.01)
    assert asr_server.service.limiter.active == 0
    assert asr_backend.closed_streams == asr_backend.open_streams == 2


async def test_streams_over_the_limit_get_resource_exhausted(asr_server, asr_stub):
    calls = []
    for _ in range(4):  # the fixture's max_streams
        call = asr_stub.StreamingRecognize()
        await call.write(config())
        await call.read()
        calls.append(call)
    assert asr_server.service.limiter.active == 4
    refused = await refusal(asr_stub.StreamingRecognize())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max-streams" in refused.details()
    for call in calls:
        call.cancel()


async def test_unavailable_while_the_model_loads():
    gate = LoadGate(open_at_start=False)
    service = AsrService(AsrSettings(port=0), CountingAsrBackendDouble(gate))
    async with running(service, wait=False) as server, channel_to(server) as channel:
        stub = asr_pb2_grpc.AsrServiceStub(channel)
        assert (await refusal(stub.StreamingRecognize())).code() == grpc.StatusCode.UNAVAILABLE
        gate.event.set()
        await server.wait_loaded()
        responses = await read_all(stub.StreamingRecognize(iter([config()])))
        assert responses[0].WhichOneof("response") == "ready"


async def test_interim_stability_is_the_share_of_words_the_previous_interim_had(asr_stub):
    requests = [config(), *audio(tone_pcm(0.5)), finalize("u1"), *audio(tone_pcm(0.3))]
    results = transcripts(await read_all(asr_stub.StreamingRecognize(iter([*requests]))))
    interims = [t for t in results if not t.is_final]
    assert len(interims) >= 6
    # The double's text grows by one "tick" per 100 ms: each interim keeps the earlier words and
    # adds one; an empty text (each utterance starts with one) has nothing stable.
    for transcript in interims:
        words = transcript.text.split()
        expected = (len(words) - 1) / len(words) if words else 0.0
        assert transcript.stability == pytest.approx(expected), transcript
    assert all(not t.words for t in results)


@pytest.mark.parametrize(
    ("previous", "text", "stability"),
    [
        (None, "a b c", 0.0),
        ("a b", "a b c", 2 / 3),
        ("a x c", "a b c", 2 / 3),
        ("b c", "a b c", 0.0),
        ("a b c d", "a b", 1.0),
        ("a", "", 0.0),
    ],
)
def test_measured_stability(previous, text, stability):
    assert measured_stability(previous, text) == pytest.approx(stability)


def test_words_are_placed_in_stream_time_inside_the_result():
    words = [
        RecognizedWord("a", -20.0, 100.0, 1.3),
        RecognizedWord("b", 90.0, 300.0, 0.5),
        RecognizedWord("c", 80.0, 900.0, -0.1),
    ]
    placed = stream_words(words, 1000, 1600)
    assert [(w.text, w.start_ms, w.end_ms) for w in placed] == [
        ("a", 1000, 1100),
        ("b", 1090, 1300),
        ("c", 1090, 1600),
    ]
    assert [w.confidence for w in placed] == pytest.approx([1.0, 0.5, 0.0])

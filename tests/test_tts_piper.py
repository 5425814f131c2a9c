"""The real TTS server with the real Piper voice (en_US-joe-medium) over gRPC."""

from __future__ import annotations

import asyncio
import importlib.util
import re
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from nemotron.speech.v1 import tts_pb2, tts_pb2_grpc
from services.runtime.audio import pcm16_to_float
from services.runtime.server import MeshServer
from services.tts.backend import SynthesisJob, SynthesisMode
from services.tts.backends.piper import PiperTtsBackend
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from services.tts.words import TimingSource
from tests.helpers import field_violation, read_all, read_rest, refusal
from tests.servers import channel_to, running
from tests.tts_messages import BATCH, CANCEL, CLOSE, STREAM, config, kinds, text

pytestmark = pytest.mark.slow

Response = tts_pb2.SynthesizeResponse
NATIVE = 22050
LONG = (
    "The quick brown fox jumps over the lazy dog, and then it runs back to the forest, where it "
    "sleeps under an old oak tree until the sun comes up again. "
)


def audio_of(responses: list[Response], segment_id: str | None = None) -> np.ndarray:
    chunks = [
        r.audio.audio
        for r in responses
        if r.HasField("audio") and segment_id in (None, r.audio.segment_id)
    ]
    return pcm16_to_float(b"".join(chunks))


def completes(responses: list[Response]) -> list[tts_pb2.SegmentComplete]:
    return [r.segment_complete for r in responses if r.HasField("segment_complete")]


@pytest.fixture
async def piper_server() -> AsyncIterator[MeshServer]:
    settings = TtsSettings(port=0, max_streams=3, max_text_chars=3000, shutdown_grace_s=0.5)
    async with running(TtsService(settings, PiperTtsBackend.from_settings(settings))) as server:
        yield server


@pytest.fixture
async def stub(piper_server: MeshServer) -> AsyncIterator[tts_pb2_grpc.TtsServiceStub]:
    async with channel_to(piper_server) as channel:
        yield tts_pb2_grpc.TtsServiceStub(channel)


async def test_list_voices_reports_joe_at_its_true_rate(stub):
    voices = (await stub.ListVoices(tts_pb2.ListVoicesRequest())).voices
    assert [
        (v.name, list(v.languages), v.sample_rate_hz, v.backend, v.is_default) for v in voices
    ] == [("joe", ["en-US", "en"], NATIVE, "piper", True)]
    assert not (await stub.ListVoices(tts_pb2.ListVoicesRequest(language="de"))).voices


async def test_stream_mode_speaks_a_sentence_in_several_chunks_with_ids(stub):
    sentence = "Sure, I can help with that today, and the weather in Paris is mild."
    responses = await read_all(stub.Synthesize(iter([config(), text("s1", sentence), CLOSE])))
    created = responses[0].stream_created
    assert (created.sample_rate_hz, created.voice, created.language) == (NATIVE, "joe", "en-US")
    assert (created.model, created.backend, created.encoding) == ("en_US-joe-medium", "piper", 1)
    assert kinds(responses)[-2:] == ["segment_complete", "done"]
    audio = [r.audio for r in responses if r.HasField("audio")]
    assert len(audio) >= 2, "STREAM mode sends the first phrase before the rest is synthesised"
    assert {a.stream_id for a in audio} == {created.stream_id}
    assert {a.segment_id for a in audio} == {"s1"}
    assert [a.sequence for a in audio] == list(range(len(audio)))
    assert all(len(a.audio) % 2 == 0 and len(a.audio) <= NATIVE for a in audio)
    samples = audio_of(responses)
    complete = completes(responses)[0]
    assert complete.audio_ms == pytest.approx(1000 * samples.size / NATIVE)
    assert 2500 < complete.audio_ms < 8000  # about 14 words
    assert float(np.sqrt(np.mean(samples**2))) > 0.02  # speech, not silence
    assert float(np.max(np.abs(samples))) <= 1.0
    assert 0 < complete.timing.ttfb_ms <= complete.timing.total_ms
    assert responses[-1].done.total_audio_ms == pytest.approx(complete.audio_ms)


async def test_segments_are_spoken_in_order_in_both_modes(stub):
    requests = [
        config(),
        text("one", "This is the first segment."),
        text("two", "And this one is synthesised in one piece.", BATCH),
        text("three", "Finally, the third."),
        CLOSE,
    ]
    responses = await read_all(stub.Synthesize(iter(requests)))
    order = [
        (r.WhichOneof("response"), r.audio.segment_id or r.segment_complete.segment_id)
        for r in responses
        if r.WhichOneof("response") in ("audio", "segment_complete")
    ]
    segment_of = [segment for _, segment in order]
    assert segment_of == sorted(segment_of, key=["one", "two", "three"].index)
    assert [s for kind, s in order if kind == "segment_complete"] == ["one", "two", "three"]
    for complete in completes(responses):
        samples = audio_of(responses, complete.segment_id)
        assert samples.size > NATIVE // 2
        assert complete.audio_ms == pytest.approx(1000 * samples.size / NATIVE)
    total = sum(c.audio_ms for c in completes(responses))
    assert responses[-1].done.total_audio_ms == pytest.approx(total)


async def test_batch_mode_sends_the_whole_segment_in_bounded_chunks(stub):
    responses = await read_all(stub.Synthesize(iter([config(), text("b", LONG, BATCH), CLOSE])))
    audio = [r.audio for r in responses if r.HasField("audio")]
    # One synthesis, cut by the servicer into messages of at most 500 ms.
    assert all(len(a.audio) // 2 <= NATIVE // 2 for a in audio)
    assert all(len(a.audio) // 2 == NATIVE // 2 for a in audio[:-1])
    assert completes(responses)[0].audio_ms > 6000


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 48000])
async def test_output_at_every_offered_rate(stub, rate):
    requests = [config(rate=rate), text("r", "Resampled speech sounds the same."), CLOSE]
    responses = await read_all(stub.Synthesize(iter(requests)))
    assert responses[0].stream_created.sample_rate_hz == rate
    samples = audio_of(responses)
    complete = completes(responses)[0]
    assert complete.audio_ms == pytest.approx(1000 * samples.size / rate)
    assert 1200 < complete.audio_ms < 4500
    assert float(np.sqrt(np.mean(samples**2))) > 0.02
    # Most speech power lies below 4 kHz, and upsampling adds nothing above the voice's Nyquist.
    power = np.abs(np.fft.rfft(samples)) ** 2
    frequencies = np.fft.rfftfreq(samples.size, 1 / rate)
    assert power[frequencies < 4000].sum() > 0.8 * power.sum()
    assert power[frequencies > NATIVE / 2 + 100].sum() < 1e-3 * power.sum()


HARD_TEXTS = {
    "numbers": "There are 1,234 apples, 3.5 pears and -7 degrees.",
    "ordinals-years": "On the 21st of May 1999 and in the 1990s.",
    "percent": "Growth was 12.5% this year.",
    "currency": "It costs $12.50, €3 or £1,000,000.",
    "abbreviations": "Dr. Smith met Mr. Jones on Baker St. at 3:30 pm, etc.",
    "smart-quotes": "\u201cHello,\u201d she said \u2014 \u2018quietly\u2019\u2026",
    "emoji": "Great job \U0001f44d\U0001f3fd\U0001f389 see you \u2764\ufe0f",
    "controls": "Line one\x00\x07\x1b[31m\r\nline two\u202e\ufeff",
    "brackets": "[[h\u0259l\u02c8o\u028a]] {not} phonemes",
    "huge-number": "Call 12345678901234567890123456789012345678901234567890 now.",
    "long-word": "x" * 900,
    "other-scripts": "\u4f60\u597d \u043f\u0440\u0438\u0432\u0435\u0442 \u0645\u0631\u062d",
    "punctuation-only": "?!... ,,, ;;;",
}


@pytest.mark.parametrize("words", HARD_TEXTS.values(), ids=HARD_TEXTS.keys())
async def test_hard_text_is_spoken_without_error(stub, words):
    responses = await read_all(stub.Synthesize(iter([config(), text("h", words), CLOSE])))
    assert kinds(responses)[0] == "stream_created"
    assert kinds(responses)[-2:] == ["segment_complete", "done"]
    complete = completes(responses)[0]
    assert complete.audio_ms == pytest.approx(1000 * audio_of(responses).size / NATIVE)


async def test_every_kind_of_text_that_should_speak_does(stub):
    speaking = [k for k in HARD_TEXTS if k not in ("punctuation-only", "other-scripts")]
    requests = [config()] + [text(k, HARD_TEXTS[k]) for k in speaking] + [CLOSE]
    responses = await read_all(stub.Synthesize(iter(requests)))
    assert [c.segment_id for c in completes(responses)] == speaking
    assert all(c.audio_ms > 300 for c in completes(responses))


async def test_empty_and_whitespace_text_completes_with_no_audio(stub):
    requests = [config(), text("empty", ""), text("blank", " \n\t\u3000 "), text("x", "\u200b")]
    responses = await read_all(stub.Synthesize(iter([*requests, CLOSE])))
    assert kinds(responses) == ["stream_created"] + ["segment_complete"] * 3 + ["done"]
    assert [c.audio_ms for c in completes(responses)] == [0, 0, 0]


@pytest.mark.timeout(90)
async def test_a_very_long_segment_is_split_and_spoken_whole(stub):
    words = LONG * 12  # 2,100 characters: split at sentences and clauses
    responses = await read_all(stub.Synthesize(iter([config(), text("long", words), CLOSE])))
    complete = completes(responses)[0]
    assert complete.audio_ms > 60_000
    audio = [r.audio for r in responses if r.HasField("audio")]
    assert [a.sequence for a in audio] == list(range(len(audio)))


@pytest.mark.parametrize(
    ("requests", "field", "message"),
    [
        ([config(voice="nobody")], "config.voice", "joe"),
        ([config(language="fr")], "config.language", "en-US"),
        ([config(rate=11025)], "config.sample_rate_hz", "48000"),
        ([config(), text("a", "x" * 3001)], "text.text", "3000"),
        ([config(), text("a" * 200, "hi")], "text.segment_id", "128"),
    ],
    ids=["unknown-voice", "unknown-language", "bad-rate", "text-too-long", "id-too-long"],
)
async def test_bad_requests_are_invalid_argument_naming_the_valid_values(
    stub, requests, field, message
):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all(stub.Synthesize(iter(requests)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert field_violation(caught.value) == field


async def test_region_tags_of_the_language_are_accepted(stub):
    responses = await read_all(stub.Synthesize(iter([config(language="en-GB"), text("a", "Hi.")])))
    assert responses[0].stream_created.language == "en"


async def test_cancel_drops_queued_and_in_flight_audio_and_opens_a_new_stream(stub):
    call = stub.Synthesize()
    await call.write(config())
    await call.write(text("long", LONG * 3))
    await call.write(text("queued", "This is never spoken."))
    old = (await call.read()).stream_created.stream_id
    assert (await call.read()).WhichOneof("response") == "audio"
    await call.write(CANCEL)
    after: list[Response] = []
    while (response := await call.read()).WhichOneof("response") != "cancelled":
        after.append(response)
    assert (response.cancelled.stream_id, response.cancelled.dropped_segments) == (old, 2)
    assert "queued" not in {r.audio.segment_id for r in after if r.HasField("audio")}
    await call.write(text("next", "A fresh start."))
    await call.done_writing()
    rest = await read_rest(call)
    assert kinds(rest)[0] == "stream_created"
    assert kinds(rest)[-2:] == ["segment_complete", "done"]
    new = rest[0].stream_created.stream_id
    assert new != old
    assert {r.audio.stream_id for r in rest if r.HasField("audio")} == {new}
    assert completes(rest)[0].audio_ms > 500


async def test_cancel_racing_with_in_flight_audio_never_leaks_audio_after_the_ack(stub):
    for attempt in range(12):
        call = stub.Synthesize()
        await call.write(config())
        await call.write(text(f"s{attempt}", LONG, STREAM if attempt % 2 else BATCH))
        await asyncio.sleep(0.015 * attempt)  # from before the first audio to mid-segment
        await call.write(CANCEL)
        await call.write(text("after", "Short."))
        await call.done_writing()
        responses = await read_rest(call)
        acked = kinds(responses).index("cancelled")
        cancelled = responses[acked].cancelled.stream_id
        assert cancelled == responses[0].stream_created.stream_id
        assert all(r.audio.stream_id != cancelled for r in responses[acked:] if r.HasField("audio"))
        assert kinds(responses)[acked + 1] == "stream_created"
        assert kinds(responses)[-2:] == ["segment_complete", "done"]


async def test_cancelling_the_rpc_stops_all_work(piper_server, stub):
    call = stub.Synthesize()
    await call.write(config())
    await call.write(text("a", LONG * 10))
    await call.read()
    await call.read()
    call.cancel()
    limiter = piper_server.service.limiter
    for _ in range(200):
        if limiter.active == 0:
            break
        await asyncio.sleep(0.01)
    assert limiter.active == 0
    # The server still serves after the abandoned call.
    responses = await read_all(stub.Synthesize(iter([config(), text("b", "Still here.")])))
    assert completes(responses)[0].audio_ms > 300


async def test_concurrent_streams_share_the_voice_independently(stub):
    sentences = [
        "The first caller asks about the weather.",
        "The second caller wants a table for two.",
        "The third caller, in a hurry, needs a taxi to the airport.",
    ]

    async def one(index: int) -> list[Response]:
        requests = [config(rate=(16000, 24000, 0)[index]), text(f"c{index}", sentences[index])]
        return await read_all(stub.Synthesize(iter([*requests, CLOSE])))

    results = await asyncio.gather(*(one(i) for i in range(3)))
    assert len({r[0].stream_created.stream_id for r in results}) == 3
    for index, responses in enumerate(results):
        rate = responses[0].stream_created.sample_rate_hz
        assert {r.audio.segment_id for r in responses if r.HasField("audio")} == {f"c{index}"}
        assert completes(responses)[0].audio_ms == pytest.approx(
            1000 * audio_of(responses).size / rate
        )
        assert completes(responses)[0].audio_ms > 1500


async def test_a_call_beyond_the_limit_is_resource_exhausted(piper_server, stub):
    calls = [stub.Synthesize() for _ in range(3)]
    for call in calls:
        await call.write(config())
        await call.write(text("hold", "Holding the line open."))
        assert (await call.read()).WhichOneof("response") == "stream_created"
    assert piper_server.service.limiter.active == 3
    refused = await refusal(stub.Synthesize())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max-streams" in refused.details()
    for call in calls:
        call.cancel()


async def test_backend_stream_mode_yields_the_first_phrase_first():
    backend = PiperTtsBackend.from_settings(TtsSettings(stream_first_words=4))
    await backend.load()
    try:
        voice = backend.voices[0]
        words = "Well, I think that we should probably leave for the station before it rains."
        stream = [
            chunk.audio.size
            async for chunk in backend.synthesize(
                SynthesisJob(words, voice, "en-US", SynthesisMode.STREAM)
            )
        ]
        batch = [
            chunk.audio.size
            async for chunk in backend.synthesize(
                SynthesisJob(words, voice, "en-US", SynthesisMode.BATCH)
            )
        ]
        assert len(stream) >= 2
        assert stream[0] < 0.25 * sum(stream)  # "Well," alone
        assert len(batch) == 1
        assert sum(stream) == pytest.approx(batch[0], rel=0.3)  # VITS durations are sampled
        empty = [
            c
            async for c in backend.synthesize(SynthesisJob(" ", voice, "en", SynthesisMode.STREAM))
        ]
        assert empty == []
    finally:
        await backend.aclose()


async def test_closing_the_generator_mid_synthesis_stops_at_the_next_phrase():
    backend = PiperTtsBackend.from_settings(TtsSettings())
    await backend.load()
    try:
        job = SynthesisJob(LONG * 2, backend.voices[0], "en-US", SynthesisMode.STREAM)
        generator = backend.synthesize(job)
        first = await anext(generator)
        assert first.audio.size > 0
        await generator.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(generator)
    finally:
        await backend.aclose()


# ---- word timings -------------------------------------------------------------------------------

MODEL_TIMES = (
    tts_pb2.WORD_TIMING_SOURCE_MODEL
    if importlib.util.find_spec("onnx")
    else tts_pb2.WORD_TIMING_SOURCE_ESTIMATED
)


def check_word_timings(
    responses: list[Response], segment_id: str, written: str, rate: int
) -> list[tts_pb2.WordTiming]:
    """Assert the contract of `AudioChunk.words` for one segment; return its words in order."""
    chunks = [r.audio for r in responses if r.WhichOneof("response") == "audio"]
    chunks = [chunk for chunk in chunks if chunk.segment_id == segment_id]
    words = [word for chunk in chunks for word in chunk.words]
    expected = [(m.group(0), m.start()) for m in re.finditer(r"\S+", written)]
    assert [(w.word, w.text_offset) for w in words] == expected
    assert all(written[w.text_offset :].startswith(w.word) for w in words)
    assert all(w.source == MODEL_TIMES for w in words)
    total_ms = 1000 * sum(len(c.audio) // 2 for c in chunks) / rate
    starts = [w.start_ms for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w.start_ms <= w.end_ms <= total_ms for w in words)
    # Each word is in the chunk its start falls in (the last chunk takes what lies beyond).
    chunk_start = 0.0
    for index, chunk in enumerate(chunks):
        chunk_end = chunk_start + 1000 * (len(chunk.audio) // 2) / rate
        for word in chunk.words:
            assert word.start_ms >= chunk_start - 1e-6
            assert word.start_ms < chunk_end or index == len(chunks) - 1
        chunk_start = chunk_end
    return words


@pytest.mark.parametrize("mode", [STREAM, BATCH])
@pytest.mark.parametrize("rate", [0, 16000, 48000])
async def test_every_word_arrives_once_with_its_start_in_its_chunk(stub, mode, rate):
    written = "Well, I think we should leave for the station, before it rains. Is that okay?"
    responses = await read_all(
        stub.Synthesize(iter([config(rate=rate), text("w", written, mode), CLOSE]))
    )
    words = check_word_timings(responses, "w", written, rate or NATIVE)
    total_ms = completes(responses)[0].audio_ms
    assert words[0].start_ms < 300
    assert words[-1].start_ms < total_ms - 100
    assert words[-1].end_ms > 0.7 * total_ms


async def test_written_numbers_and_symbols_keep_their_own_words_and_offsets(stub):
    segments = {
        "money": "It costs $42. Thanks!",
        "mixed": "Dr. Smith paid \u20ac1,500 at 3:30 pm \U0001f44d, ok?",
        "hard": HARD_TEXTS["currency"],
        "quotes": HARD_TEXTS["smart-quotes"],
    }
    requests = [config()] + [text(k, v) for k, v in segments.items()] + [CLOSE]
    responses = await read_all(stub.Synthesize(iter(requests)))
    for segment_id, written in segments.items():
        check_word_timings(responses, segment_id, written, NATIVE)
    money = check_word_timings(responses, "money", segments["money"], NATIVE)
    assert [(w.word, w.text_offset) for w in money] == [
        ("It", 0),
        ("costs", 3),
        ("$42.", 9),
        ("Thanks!", 14),
    ]
    # "$42." is spoken as "forty two dollars": it lasts several times longer than "It".
    assert money[2].end_ms - money[2].start_ms > 2 * (money[0].end_ms - money[0].start_ms)


async def test_words_track_the_audio(stub):
    """A word starts where there is speech, and the pause of a sentence end lies between words."""
    written = "Hello there. Goodbye now."
    responses = await read_all(stub.Synthesize(iter([config(), text("t", written), CLOSE])))
    words = check_word_timings(responses, "t", written, NATIVE)
    samples = audio_of(responses, "t")
    frame = NATIVE // 100  # 10 ms frames
    energy = np.array(
        [np.sqrt(np.mean(samples[i : i + frame] ** 2)) for i in range(0, samples.size, frame)]
    )
    speech = energy > 0.1 * energy.max()

    def voiced_near(ms: float) -> bool:
        index = int(ms // 10)
        return bool(speech[max(0, index - 3) : index + 8].any())

    assert all(voiced_near(w.start_ms) for w in words)
    gap = slice(int(words[1].end_ms // 10) + 1, int(words[2].start_ms // 10) - 1)
    assert words[2].start_ms - words[1].end_ms > 100
    assert not speech[gap].any()


async def test_unspoken_text_has_no_words_and_an_emoji_keeps_its_place(stub):
    requests = [config(), text("blank", "  \t "), text("e", "Thanks \U0001f642 friend \U0001f642")]
    responses = await read_all(stub.Synthesize(iter([*requests, CLOSE])))
    assert not [r for r in responses if r.HasField("audio") and r.audio.segment_id == "blank"]
    words = check_word_timings(responses, "e", "Thanks \U0001f642 friend \U0001f642", NATIVE)
    assert [w.word for w in words] == ["Thanks", "\U0001f642", "friend", "\U0001f642"]
    assert words[1].start_ms == words[1].end_ms == words[0].end_ms
    assert words[3].start_ms == words[2].end_ms


async def test_without_the_onnx_package_word_times_are_estimated(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "onnx" else find_spec(name, *args),
    )
    backend = PiperTtsBackend.from_settings(TtsSettings())
    await backend.load()
    try:
        words = "Well, I think we should leave before it rains."
        job = SynthesisJob(words, backend.voices[0], "en-US", SynthesisMode.STREAM)
        chunks = [chunk async for chunk in backend.synthesize(job)]
        times = [t for chunk in chunks for t in chunk.words]
        assert [t.index for t in times] == list(range(len(words.split())))
        assert {chunk.source for chunk in chunks} == {TimingSource.ESTIMATED}
        for chunk in chunks:
            chunk_ms = 1000 * chunk.audio.size / NATIVE
            assert all(0 <= t.start_ms <= t.end_ms <= chunk_ms for t in chunk.words)
    finally:
        await backend.aclose()

"""The Whisper backend with its real tiny.en weights, streamed real speech through real gRPC."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc
from services.asr.backend import (
    AudioEvent,
    FinalizeEvent,
    FinalizeKind,
    Hypothesis,
    RecognizerEvent,
    StreamOptions,
)
from services.asr.backends.decode_pool import DecodePool, Priority
from services.asr.backends.utterance import UtteranceAudio
from services.asr.backends.whisper import WhisperAsrBackend, _Decoded
from services.asr.backends.whisper_models import WhisperWeights
from services.asr.backends.whisper_window import window_frames
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.runtime.audio import float_to_pcm16, pcm16_to_float
from services.runtime.server import MeshServer
from services.runtime.streams import StreamQueue
from tests.asr_messages import Req, audio, check_words, config, finalize, transcripts
from tests.helpers import read_all, silence_pcm
from tests.servers import channel_to, running
from tests.speech import speech_pcm, wer

pytestmark = pytest.mark.slow

BOOK = "Please book a table for two at seven tonight."
WEATHER = "What is the weather like in Paris tomorrow morning?"
LIGHTS = "Turn off the lights in the kitchen."
# tiny.en hears most of these word for word; the bound leaves room for one slip per sentence.
MAX_WER = 0.2


def finals(responses: list[asr_pb2.StreamingRecognizeResponse]) -> list[asr_pb2.Transcript]:
    return [t for t in transcripts(responses) if t.is_final or t.soft]


async def paced(requests: list[Req], frame_s: float = 0.01) -> AsyncIterator[Req]:
    """Send audio at about twice real time, as a microphone would (interims get their chance)."""
    for request in requests:
        if request.WhichOneof("request") == "audio":
            await asyncio.sleep(frame_s)
        yield request


@pytest.fixture
async def whisper_server() -> AsyncIterator[MeshServer]:
    settings = AsrSettings(port=0, max_streams=4, max_utterance_s=6.0, shutdown_grace_s=0.5)
    backend = WhisperAsrBackend.from_settings(settings)
    async with running(AsrService(settings, backend)) as server:
        yield server


@pytest.fixture
async def stub(whisper_server: MeshServer) -> AsyncIterator[asr_pb2_grpc.AsrServiceStub]:
    async with channel_to(whisper_server) as channel:
        yield asr_pb2_grpc.AsrServiceStub(channel)


@pytest.mark.timeout(90)
async def test_streamed_speech_gets_interims_and_one_final_per_finalize(stub):
    requests = [
        config(interim=True),
        *audio(speech_pcm(BOOK)),
        finalize("u1"),
        *audio(speech_pcm(WEATHER)),
        finalize("u2"),
    ]
    responses = await read_all(stub.StreamingRecognize(paced(requests)))
    ready = responses[0].ready
    assert (ready.model, ready.backend, ready.language) == ("whisper-tiny.en", "whisper", "en")
    results = transcripts(responses)
    done = [t for t in results if t.is_final]
    assert [t.utterance_id for t in done] == ["u1", "u2"]
    assert wer(BOOK, done[0].text) <= MAX_WER, done[0].text
    assert wer(WEATHER, done[1].text) <= MAX_WER, done[1].text
    assert done[1].audio_start_ms == done[0].audio_end_ms
    interims = [t for t in results if not t.is_final]
    assert interims, "interim results were asked for"
    assert all(not t.utterance_id and not t.soft for t in interims)
    assert all(a.text != b.text for a, b in itertools.pairwise(interims))


async def test_silence_and_a_quiet_room_give_empty_finals(stub):
    rng = np.random.default_rng(1)
    hiss = float_to_pcm16(0.002 * rng.standard_normal(16000).astype(np.float32))
    requests = [
        config(interim=True),
        *audio(silence_pcm(1.5)),
        finalize("quiet"),
        *audio(hiss),
        finalize("hiss"),
    ]
    results = transcripts(await read_all(stub.StreamingRecognize(iter(requests))))
    assert [(t.utterance_id, t.text) for t in results] == [("quiet", ""), ("hiss", "")]


@pytest.mark.timeout(90)
async def test_soft_finalize_answers_the_hypothesis_and_the_utterance_goes_on(stub):
    requests = [
        config(),
        *audio(speech_pcm(LIGHTS)),
        finalize("peek", soft=True),
        *audio(speech_pcm(BOOK)),
        finalize("end"),
    ]
    soft, hard = finals(await read_all(stub.StreamingRecognize(iter(requests))))
    assert (soft.utterance_id, soft.soft, soft.is_final) == ("peek", True, False)
    assert wer(LIGHTS, soft.text) <= MAX_WER, soft.text
    assert (hard.utterance_id, hard.soft, hard.is_final) == ("end", False, True)
    assert wer(f"{LIGHTS} {BOOK}", hard.text) <= MAX_WER, hard.text
    assert hard.audio_start_ms == 0, "a soft finalize does not end the utterance"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("rate", [8000, 48000])
async def test_other_sample_rates_are_recognized(stub, rate):
    requests = [config(rate), *audio(speech_pcm(WEATHER, rate), rate), finalize("r")]
    (final,) = finals(await read_all(stub.StreamingRecognize(iter(requests))))
    assert wer(WEATHER, final.text) <= MAX_WER, final.text


async def test_odd_byte_counts_and_empty_chunks(stub):
    pcm = speech_pcm(LIGHTS)
    pieces = [Req(audio=pcm[i : i + 333]) for i in range(0, len(pcm), 333)]
    requests = [config(), Req(audio=b""), *pieces, Req(audio=b""), finalize("odd")]
    (final,) = finals(await read_all(stub.StreamingRecognize(iter(requests))))
    assert wer(LIGHTS, final.text) <= MAX_WER, final.text


@pytest.mark.timeout(90)
async def test_long_utterance_is_cut_at_the_cap_and_nothing_is_lost(stub):
    # The fixture caps utterances at 6 s; three sentences with pauses make about 9 s.
    pause = silence_pcm(0.6)
    pcm = speech_pcm(BOOK) + pause + speech_pcm(WEATHER) + pause + speech_pcm(LIGHTS)
    requests = [config(), *audio(pcm)]  # half-close with audio pending
    results = finals(await read_all(stub.StreamingRecognize(iter(requests))))
    assert [t.final_reason for t in results] == [
        asr_pb2.FINAL_REASON_MAX_DURATION,
        asr_pb2.FINAL_REASON_END_OF_STREAM,
    ]
    assert results[0].audio_end_ms == 6000
    joined = " ".join(t.text for t in results)
    # A word cut in two at the 6 s boundary may be misheard on both sides.
    assert wer(f"{BOOK} {WEATHER} {LIGHTS}", joined) <= 0.3, joined


@pytest.mark.timeout(120)
async def test_streams_do_not_affect_each_other(whisper_server, stub):
    async def speak(text: str, uid: str) -> asr_pb2.Transcript:
        requests = [config(interim=True), *audio(speech_pcm(text)), finalize(uid)]
        (final,) = [
            t
            for t in transcripts(await read_all(stub.StreamingRecognize(paced(requests))))
            if t.is_final
        ]
        return final

    async def misbehave() -> grpc.StatusCode:
        requests = [config(), *audio(speech_pcm(LIGHTS))[:40], config()]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all(stub.StreamingRecognize(paced(requests)))
        return caught.value.code()

    async def cancel_midway() -> None:
        call = stub.StreamingRecognize()
        await call.write(config(interim=True))
        await call.read()
        for request in audio(speech_pcm(BOOK))[:80]:
            await call.write(request)
            await asyncio.sleep(0.01)
        call.cancel()

    book, weather, code, _ = await asyncio.gather(
        speak(BOOK, "a"), speak(WEATHER, "b"), misbehave(), cancel_midway()
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert (book.utterance_id, weather.utterance_id) == ("a", "b")
    assert wer(BOOK, book.text) <= MAX_WER, book.text
    assert wer(WEATHER, weather.text) <= MAX_WER, weather.text
    # Every slot is free again, and the server still recognizes.
    (after,) = [
        t
        for t in transcripts(
            await read_all(
                stub.StreamingRecognize(
                    iter([config(), *audio(speech_pcm(LIGHTS)), finalize("after")])
                )
            )
        )
        if t.is_final
    ]
    assert wer(LIGHTS, after.text) <= MAX_WER, after.text
    assert whisper_server.service.limiter.active == 0


async def test_unknown_model_fails_at_start_with_a_hint():
    from services.runtime.registry import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="CTranslate2 model folder"):
        WhisperAsrBackend.from_settings(AsrSettings(model="/nonexistent/whisper"))


# The two helpers the backend is built on, without the model.


async def test_decode_pool_runs_finals_before_interims_one_at_a_time():
    pool: DecodePool[str] = DecodePool()
    order: list[str] = []
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def job(name: str, block: bool = False):
        def work() -> str:
            if block:
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)
            order.append(name)
            return name

        return lambda: work

    first = asyncio.create_task(pool.run(Priority.INTERIM, job("first", block=True)))
    await asyncio.sleep(0.05)
    interim = asyncio.create_task(pool.run(Priority.INTERIM, job("interim")))
    dropped = asyncio.create_task(pool.run(Priority.INTERIM, job("dropped")))
    final = asyncio.create_task(pool.run(Priority.FINAL, job("final")))
    await asyncio.sleep(0.05)
    assert pool.queued == 3
    dropped.cancel()
    gate.set()
    assert await asyncio.gather(first, interim, final) == ["first", "interim", "final"]
    assert order == ["first", "final", "interim"]
    pool.close()


def test_utterance_buffer_is_bounded_trims_leading_silence_and_gates_silence():
    buffer = UtteranceAudio(capacity_s=1.0)
    buffer.append(np.zeros(8000, dtype=np.float32))
    # Silence before any speech is kept to the 0.3 s pre-roll; the clock keeps what went.
    assert not buffer.voiced and len(buffer) == 4800 and buffer.offset_ms == 200
    loud = (0.3 * np.ones(3200)).astype(np.float32)
    buffer.append(loud)
    assert buffer.voiced and buffer.voiced_end == 8000 and buffer.offset_ms == 200
    buffer.append(np.zeros(11200, dtype=np.float32))  # overflows: the oldest audio goes
    assert len(buffer) == 16000 and buffer.dropped == 3200 and buffer.voiced_end == 4800
    # Settled once a decode reaches 150 ms past the last voiced frame (or the end of the audio).
    assert buffer.settled(7200) and not buffer.settled(7199) and not buffer.settled(4800)
    buffer.clear()
    assert len(buffer) == 0 and not buffer.voiced and buffer.offset_ms == 0
    # Silence and speech in one chunk: the speech is kept with its pre-roll from the 20 ms
    # frame it starts in.
    buffer.append(np.concatenate([np.zeros(12010, dtype=np.float32), loud]))
    assert buffer.trimmed == 12010 // 320 * 320 - 4800 and buffer.voiced_end == len(buffer)


def test_final_audio_is_the_same_however_long_the_pause():
    rng = np.random.default_rng(3)
    speech = (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    hush = (0.001 * rng.standard_normal(16000)).astype(np.float32)  # a room, under the gate
    buffers = {}
    for pause_ms in (100, 200, 500):
        buffer = UtteranceAudio(capacity_s=4.0)
        buffer.append(speech)
        buffer.append(hush[: pause_ms * 16])
        buffers[pause_ms] = buffer
    after_pause = {ms: buffers[ms].final_snapshot(0.6) for ms in (200, 500)}
    # Once the pause reaches 150 ms: the speech, 150 ms of the room, silence to 0.6 s past it.
    assert buffers[200].final_key == buffers[500].final_key
    np.testing.assert_array_equal(after_pause[200], after_pause[500])
    assert after_pause[200].size == 16000 + 9600
    np.testing.assert_array_equal(after_pause[200][: 16000 + 2400], buffers[500].snapshot()[:18400])
    assert not after_pause[200][18400:].any()
    # Before the pause reaches 150 ms, all of it (and a later finalize would hear more).
    early = buffers[100].final_snapshot(0.6)
    assert buffers[100].final_key != buffers[200].final_key
    np.testing.assert_array_equal(early[:17600], buffers[100].snapshot())
    assert early.size == 16000 + 9600 and not early[17600:].any()


async def test_speech_after_a_pause_gets_a_new_end_decode():
    # A pause long enough to start the end decode, then more speech: the finalize after the
    # second pause must hear both parts, not reuse the decode of the first.
    decoded: list[int] = []
    backend = slow_whisper(0.1, decoded)
    events: StreamQueue[RecognizerEvent] = StreamQueue(64)
    voiced = np.full(320, 0.3, dtype=np.float32)
    quiet = np.zeros(320, dtype=np.float32)

    async def feed() -> None:
        for frames in ((voiced, 50), (quiet, 15), (voiced, 25), (quiet, 15)):
            for _ in range(frames[1]):
                await events.put(AudioEvent(frames[0]))
                await asyncio.sleep(0.02)
        await events.put(FinalizeEvent("end", FinalizeKind.FINALIZE))
        events.close()

    results = await recognize_timed(backend, False, events, feed())
    (final,) = [h for h, _ in results if h.answers is not None]
    # The speech ends at 1.8 s, then silence to 0.6 s past it; the first pause's decode (1 s of
    # speech and its 0.6 s) was not reused.
    assert final.text == "heard 38400", final.text
    assert decoded == [25600, 38400], decoded


def slow_whisper(decode_s: float, decoded: list[int]) -> WhisperAsrBackend:
    """The whisper backend with a stand-in model: `decode_s` per decode, text = samples heard."""
    backend = WhisperAsrBackend(WhisperWeights("whisper-slow-double", folder=Path("/nowhere")))

    def slow_decode(audio: np.ndarray, language: str, words: bool = False) -> _Decoded:
        time.sleep(decode_s)
        decoded.append(audio.size)
        return _Decoded(f"heard {audio.size}", audio.size)

    backend._decode = slow_decode  # type: ignore[method-assign]
    backend._pool = DecodePool()
    return backend


async def recognize_timed(
    backend: WhisperAsrBackend,
    interim_results: bool,
    events: StreamQueue[RecognizerEvent],
    feed: Any,
) -> list[tuple[Hypothesis, float]]:
    """Run one stream while `feed` fills `events`; each hypothesis with the time it came."""
    feeder = asyncio.create_task(feed)
    results: list[tuple[Hypothesis, float]] = []
    async for hypothesis in backend.recognize(StreamOptions("s", "en", interim_results), events):
        results.append((hypothesis, time.perf_counter()))
    await feeder
    assert backend._pool is not None
    backend._pool.close()
    return results


async def test_interim_cadence_adapts_to_a_slow_model_and_never_falls_behind():
    # A model that needs 0.2 s per decode while audio arrives at 4x real time: re-decoding every
    # 0.25 s of audio would queue a decode every 62 ms and fall further behind with every one.
    decode_s = 0.2
    decoded: list[int] = []
    backend = slow_whisper(decode_s, decoded)
    events: StreamQueue[RecognizerEvent] = StreamQueue(64)
    voiced = np.full(320, 0.3, dtype=np.float32)  # 20 ms frames
    fed: list[float] = []

    async def feed() -> None:
        started = time.perf_counter()
        for _ in range(150):  # 3 s of audio
            await events.put(AudioEvent(voiced))
            await asyncio.sleep(0.005)
        fed.append(time.perf_counter() - started)
        await events.put(FinalizeEvent("end", FinalizeKind.FINALIZE))
        events.close()

    results = await recognize_timed(backend, True, events, feed())
    interims = [h for h, _ in results if h.answers is None]
    (final, answered_at), *_ = [(h, t) for h, t in results if h.answers is not None]
    # The final decode hears the whole utterance, then 0.6 s of silence (FINAL_SILENCE_S).
    assert final.text == "heard 57600", final.text
    assert final.answers is not None
    # Decodes were skipped, not queued: at most one per decode time while audio arrived, each
    # taking all the audio that had arrived meanwhile; the finalize waits for at most the interim
    # decode in flight and its own.
    assert len(interims) <= fed[0] / decode_s + 2, len(interims)
    assert all(a.audio_ms < b.audio_ms for a, b in itertools.pairwise(interims))
    assert decoded == sorted(decoded)
    assert answered_at - final.answers.received_at < 2 * decode_s + 0.3


async def test_a_finalize_does_not_wait_behind_other_streams_interim_decodes():
    decoded: list[int] = []
    backend = slow_whisper(0.1, decoded)
    pool = backend._pool
    assert pool is not None
    order: list[str] = []

    def other(name: str, seconds: float) -> Any:
        def work() -> None:
            time.sleep(seconds)
            order.append(name)

        return lambda: work

    # Another stream's decode holds the thread, and its next interim decode waits in line.
    busy = asyncio.create_task(pool.run(Priority.FINAL, other("busy", 0.3)))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(pool.run(Priority.INTERIM, other("other interim", 0.1)))
    events: StreamQueue[RecognizerEvent] = StreamQueue(64)

    async def feed() -> None:
        for _ in range(25):  # 0.5 s: this stream's interim decode joins the line
            await events.put(AudioEvent(np.full(320, 0.3, dtype=np.float32)))
        await asyncio.sleep(0.05)
        assert pool.queued == 2, "this stream's interim decode waits behind the other one"
        await events.put(FinalizeEvent("end", FinalizeKind.FINALIZE))
        events.close()

    feeder = asyncio.create_task(feed())
    answers = [
        h
        async for h in backend.recognize(StreamOptions("s", "en", True), events)
        if h.answers is not None
    ]
    order.append("final")
    await asyncio.gather(feeder, busy, queued)
    pool.close()
    assert [h.text for h in answers] == ["heard 17600"], "0.5 s of speech, then 0.6 s of silence"
    assert decoded == [17600], "the interim decode still in line was dropped, not run"
    assert order == ["busy", "final", "other interim"]


async def test_without_interims_a_pause_decodes_ahead_of_the_finalize():
    # interim_results off: no decode while the caller speaks, one at the pause, and the finalize
    # that follows the pause reuses it instead of decoding the whole utterance again.
    decode_s = 0.2
    decoded: list[int] = []
    backend = slow_whisper(decode_s, decoded)
    events: StreamQueue[RecognizerEvent] = StreamQueue(64)
    voiced = np.full(320, 0.3, dtype=np.float32)
    quiet = np.zeros(320, dtype=np.float32)
    decodes_while_speaking: list[int] = []

    async def feed() -> None:
        for _ in range(50):  # 1 s of speech at real time
            await events.put(AudioEvent(voiced))
            await asyncio.sleep(0.02)
        decodes_while_speaking.append(len(decoded))
        for _ in range(25):  # then 0.5 s of pause before the client's finalize
            await events.put(AudioEvent(quiet))
            await asyncio.sleep(0.02)
        await events.put(FinalizeEvent("end", FinalizeKind.FINALIZE))
        events.close()

    results = await recognize_timed(backend, False, events, feed())
    assert decodes_while_speaking == [0]
    assert len(decoded) == 1, "one decode, at the pause; the finalize reused it"
    final, answered_at = next((h, t) for h, t in results if h.answers is not None)
    assert final.text == "heard 25600", "1 s of speech, then 0.6 s of silence"
    assert final.answers is not None
    assert answered_at - final.answers.received_at < decode_s


def test_encoder_window_fits_the_utterance_with_room_to_spare():
    assert window_frames(0) == 1000  # never under 10 s
    assert window_frames(250) == 1000
    assert window_frames(501) == 1250  # 5 s of padding after the audio, in 2.5 s steps
    assert window_frames(2000) == 2500
    assert window_frames(2600) == 3000 == window_frames(10_000)  # Whisper's own 30 s at most
    for count in range(0, 3000, 37):
        window = window_frames(count)
        assert window == 3000 or window - count >= 500


@pytest.mark.timeout(120)
async def test_sized_and_full_encoder_windows_hear_the_same_words():
    backends = {
        mode: WhisperAsrBackend.from_settings(AsrSettings(port=0, encoder_window=mode))
        for mode in ("auto", "full")
    }
    for backend in backends.values():
        await backend.load()
    try:
        for text in (BOOK, WEATHER, f"{LIGHTS} {BOOK} {WEATHER}"):
            samples = pcm16_to_float(speech_pcm(text))
            heard = {mode: b._decode(samples, "en").text for mode, b in backends.items()}
            assert wer(text, heard["auto"]) <= max(MAX_WER, wer(text, heard["full"])), heard
        quiet = np.zeros(2 * 16000, dtype=np.float32)
        assert backends["auto"]._decode(quiet, "en").text == ""
        long = np.zeros(28 * 16000, dtype=np.float32)  # no room for padding: the full window
        assert backends["auto"]._windowed is not None
        assert not backends["auto"]._windowed.fits(long)
    finally:
        for backend in backends.values():
            await backend.aclose()


# ---- words and stability ------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rate", [16000, 48000])
async def test_words_with_times_inside_each_utterance_when_asked(stub, rate):
    gap = silence_pcm(0.7, rate)
    requests = [
        config(rate=rate, interim=True, words=True),
        *audio(gap + speech_pcm(BOOK, rate), rate),
        finalize("u1"),
        *audio(gap + speech_pcm(LIGHTS, rate), rate),
        finalize("u2"),
    ]
    results = transcripts(await read_all(stub.StreamingRecognize(paced(requests))))
    done = [t for t in results if t.is_final]
    assert [t.utterance_id for t in done] == ["u1", "u2"]
    for transcript in results:
        check_words(transcript)
    for final in done:
        assert final.words and final.stability == 1.0
        # The speech starts after 0.7 s of silence in each utterance; Whisper's 20 ms alignment
        # steps and its habit of starting a word early leave it within 0.4 s of that.
        lead = final.words[0].start_ms - final.audio_start_ms
        assert 300 <= lead <= 1200, lead
        assert final.words[-1].end_ms > final.words[0].start_ms + 500
    assert done[1].words[0].start_ms >= done[0].audio_end_ms


@pytest.mark.timeout(120)
async def test_words_after_a_long_silence_are_timed_where_they_were_said(stub):
    # A microphone streams all along: the utterance holds 4 s of silence (the bot's reply, on a
    # headset) before the user speaks. Whisper spread the words over that silence, seconds early.
    speech = speech_pcm(WEATHER)
    samples = pcm16_to_float(speech)
    onset_ms = 4000 + 1000 * int(np.flatnonzero(np.abs(samples) > 0.02)[0]) / 16000
    requests = [
        config(interim=True, words=True),
        *audio(silence_pcm(4.0) + speech),
        finalize("u1"),
    ]
    results = transcripts(await read_all(stub.StreamingRecognize(paced(requests))))
    timed = [t for t in results if t.words]
    assert timed and timed[-1].is_final
    for transcript in timed:
        check_words(transcript)
        assert transcript.words[0].start_ms >= onset_ms - 400, (onset_ms, transcript.words[0])


async def test_no_words_unless_asked(stub):
    requests = [config(interim=True), *audio(speech_pcm(LIGHTS)), finalize("u")]
    results = transcripts(await read_all(stub.StreamingRecognize(paced(requests))))
    assert results and all(not t.words for t in results)


@pytest.mark.timeout(90)
async def test_interim_stability_is_measured_and_finals_are_stable(stub):
    requests = [config(interim=True), *audio(speech_pcm(WEATHER)), finalize("u")]
    results = transcripts(await read_all(stub.StreamingRecognize(paced(requests))))
    interims = [t for t in results if not t.is_final]
    assert len(interims) >= 2
    assert interims[0].stability == 0.0  # nothing came before it
    for previous, current in itertools.pairwise(interims):
        old, new = previous.text.split(), current.text.split()
        kept = sum(1 for a, b in zip(old, new, strict=False) if a == b)
        assert current.stability == pytest.approx(kept / len(new))
    assert all(0.0 <= t.stability <= 1.0 for t in interims)
    assert results[-1].is_final and results[-1].stability == 1.0

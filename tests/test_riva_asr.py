"""Riva's speech recognition API on the ASR server, driven by NVIDIA's own client (riva.client).

The server runs in process with the real Whisper tiny.en backend; the Riva client is synchronous,
so each call runs in a thread while the server runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest

from services.asr.backends.whisper import WhisperAsrBackend
from services.asr.endpointing import Endpointer, EndpointingRules
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.runtime.server import MeshServer
from tests.helpers import silence_pcm
from tests.servers import channel_to, running, target_of
from tests.speech import speech_pcm, wer

riva_client = pytest.importorskip("riva.client", reason="nvidia-riva-client is in the dev group")

from riva.client.proto import riva_asr_pb2  # noqa: E402

BOOK = "Please book a table for two at seven tonight."
WEATHER = "What is the weather like in Paris tomorrow morning?"
# tiny.en hears these word for word; the bound leaves room for one slip per sentence.
MAX_WER = 0.2
RIVA_ASR = "nvidia.riva.asr.RivaSpeechRecognition"


def config(
    rate: int = 16000, punctuation: bool = True, words: bool = False, **fields: object
) -> riva_asr_pb2.RecognitionConfig:
    return riva_client.RecognitionConfig(
        encoding=riva_client.AudioEncoding.LINEAR_PCM,
        sample_rate_hertz=rate,
        language_code="en-US",
        max_alternatives=1,
        enable_automatic_punctuation=punctuation,
        enable_word_time_offsets=words,
        audio_channel_count=1,
        **fields,
    )


def chunks(
    pcm: bytes, rate: int = 16000, chunk_ms: int = 100, pace: float = 0.25
) -> Iterator[bytes]:
    """`pcm` in chunks, sent at 1/`pace` times real time, as a microphone would (faster)."""
    size = 2 * rate * chunk_ms // 1000
    for start in range(0, len(pcm), size):
        time.sleep(pace * chunk_ms / 1000)
        yield pcm[start : start + size]


@pytest.fixture(scope="module")
def two_sentences() -> bytes:
    return (
        silence_pcm(0.3)
        + speech_pcm(BOOK)
        + silence_pcm(1.2)
        + speech_pcm(WEATHER)
        + (silence_pcm(1.2))
    )


@pytest.fixture
async def whisper_server() -> AsyncIterator[MeshServer]:
    settings = AsrSettings(port=0, max_streams=2, shutdown_grace_s=0.5)
    async with running(AsrService(settings, WhisperAsrBackend.from_settings(settings))) as server:
        yield server


@pytest.fixture
async def asr(whisper_server: MeshServer) -> AsyncIterator[riva_client.ASRService]:
    auth = riva_client.Auth(uri=target_of(whisper_server), use_ssl=False)
    yield riva_client.ASRService(auth)
    auth.channel.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_streaming_recognition_ends_utterances_on_the_server(asr, two_sentences):
    streaming = riva_client.StreamingRecognitionConfig(
        config=config(words=True), interim_results=True
    )

    def recognize() -> list[riva_asr_pb2.StreamingRecognizeResponse]:
        return list(asr.streaming_response_generator(chunks(two_sentences), streaming))

    responses = await asyncio.to_thread(recognize)
    results = [result for response in responses for result in response.results]
    finals = [r for r in results if r.is_final]
    interims = [r for r in results if not r.is_final]
    # The client never finalizes: the server's endpointing split the two sentences.
    assert len(finals) == 2, [r.alternatives[0].transcript for r in finals]
    for final, sentence in zip(finals, (BOOK, WEATHER), strict=True):
        text = final.alternatives[0].transcript
        assert wer(sentence, text) <= MAX_WER, text
        assert text[0].isupper() and text[-1] in ".?!"  # punctuation was asked for
        words = final.alternatives[0].words
        assert [w.word for w in words] == text.split()
        starts = [w.start_time for w in words]
        assert starts == sorted(starts) and all(w.end_time >= w.start_time for w in words)
    total_ms = 1000 * len(two_sentences) / 2 / 16000
    assert 0 < finals[0].alternatives[0].words[0].start_time < 1000
    assert finals[1].alternatives[0].words[-1].end_time < total_ms
    assert finals[0].audio_processed < finals[1].audio_processed <= total_ms / 1000 + 0.1
    assert interims, "interim results were asked for"
    assert all(0 < r.stability < 1 for r in interims)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_endpointing_settings_decide_where_utterances_end(asr):
    # A 0.5 s pause inside the speech: the default 800 ms stop window keeps one utterance, a
    # 300 ms window (as Pipecat's NvidiaSTTService sends) cuts it in two.
    pcm = speech_pcm(BOOK) + silence_pcm(0.5) + speech_pcm(WEATHER) + silence_pcm(1.0)

    def finals(stop_history: int) -> list[str]:
        streaming = riva_client.StreamingRecognitionConfig(config=config(), interim_results=False)
        riva_client.add_endpoint_parameters_to_config(streaming, -1, -1, stop_history, -1, -1, -1)
        responses = asr.streaming_response_generator(chunks(pcm, pace=0.05), streaming)
        return [r.alternatives[0].transcript for resp in responses for r in resp.results]

    assert len(await asyncio.to_thread(finals, 0)) == 1
    assert len(await asyncio.to_thread(finals, 300)) == 2


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_offline_recognition_of_a_wav_file(asr, two_sentences):
    wav = io.BytesIO()
    with wave.open(wav, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(two_sentences)
    # As Riva's examples send a file: the header says the rate, the config may leave it at 0.
    response = await asyncio.to_thread(
        asr.offline_recognize, wav.getvalue(), config(rate=0, punctuation=False)
    )
    texts = [result.alternatives[0].transcript for result in response.results]
    assert len(texts) == 2
    assert wer(f"{BOOK} {WEATHER}", " ".join(texts)) <= MAX_WER
    # Without automatic punctuation: Riva's style, lower case and no marks.
    assert all(text == text.lower() and not any(c in text for c in ".,?!") for text in texts)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_offline_recognition_resamples_raw_audio(asr):
    response = await asyncio.to_thread(
        asr.offline_recognize, speech_pcm(BOOK, rate=8000), config(rate=8000)
    )
    assert wer(BOOK, " ".join(r.alternatives[0].transcript for r in response.results)) <= MAX_WER


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"encoding": riva_client.AudioEncoding.MULAW}, "MULAW"),
        ({"encoding": riva_client.AudioEncoding.OGGOPUS}, "OGGOPUS"),
        ({"sample_rate_hertz": 12345}, "12345"),
        ({"language_code": "de-DE"}, "de-DE"),
        ({"audio_channel_count": 2}, "audio_channel_count"),
        ({"model": "parakeet"}, "parakeet"),
    ],
)
async def test_bad_configs_get_invalid_argument_naming_the_problem(asr, fields, named):
    bad = config()
    for name, value in fields.items():
        setattr(bad, name, value)
    streaming = riva_client.StreamingRecognitionConfig(config=bad)
    with pytest.raises(grpc.RpcError) as streamed:
        await asyncio.to_thread(
            lambda: list(asr.streaming_response_generator(iter([b"\0\0" * 160]), streaming))
        )
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in streamed.value.details()
    with pytest.raises(grpc.RpcError) as offline:
        await asyncio.to_thread(asr.offline_recognize, b"\0\0" * 160, bad)
    assert offline.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in offline.value.details()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_config_health_and_reflection_cover_the_riva_service(asr, whisper_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    described = await asyncio.to_thread(
        asr.stub.GetRivaSpeechRecognitionConfig,
        riva_asr_pb2.RivaSpeechRecognitionConfigRequest(),
    )
    (model,) = described.model_config
    assert model.model_name == "whisper-tiny.en"
    assert model.parameters["language_code"] == "en"
    async with channel_to(whisper_server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=RIVA_ASR))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for answer in reflection.ServerReflectionInfo(iter([request])):
            names = {s.name for s in answer.list_services_response.service}
            assert {RIVA_ASR, "nemotron.speech.v1.AsrService"} <= names


def test_endpointer_follows_riva_rules():
    rate = 16000
    speech = (0.1 * np.sin(np.arange(rate) / 5)).astype(np.float32)  # 1 s, well above the gate
    quiet = np.zeros(rate, dtype=np.float32)
    endpointer = Endpointer(EndpointingRules(stop_history_ms=400), rate)
    assert endpointer.push(quiet) == 0 and not endpointer.in_speech
    assert endpointer.push(speech) == 0 and endpointer.in_speech
    assert endpointer.push(quiet[: rate * 3 // 10]) == 0  # 300 ms: not yet
    assert endpointer.push(quiet[: rate * 2 // 10]) == 1  # 500 ms of silence: the end
    assert endpointer.timeline.speech_within(0, 3000) == (1000, 2000)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_word_offsets_are_the_recognizers_own_at_any_rate(asr):
    rate = 48000
    book_s = len(speech_pcm(BOOK)) / 2 / 16000
    pcm = (
        silence_pcm(0.3, rate)
        + speech_pcm(BOOK, rate)
        + silence_pcm(1.2, rate)
        + speech_pcm(WEATHER, rate)
        + silence_pcm(1.2, rate)
    )
    response = await asyncio.to_thread(
        asr.offline_recognize, pcm, config(rate=rate, punctuation=False, words=True)
    )
    first, second = (result.alternatives[0] for result in response.results)
    for alternative in (first, second):
        assert [w.word for w in alternative.words] == alternative.transcript.split()
        assert all(0 < w.confidence <= 1 for w in alternative.words)
    # Whisper's alignment of each sentence's first word, in ms of the stream at 48 kHz.
    assert 100 <= first.words[0].start_time <= 800
    second_starts = 1000 * (0.3 + book_s + 1.2)
    assert abs(second.words[0].start_time - second_starts) <= 400
    assert first.words[-1].end_time <= 1000 * (0.3 + book_s) + 300

"""Riva's speech synthesis API on the TTS server, driven by NVIDIA's own client (riva.client).

The server runs in process with the real Piper voice (joe, 22050 Hz); the Riva client is
synchronous, so each call runs in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from services.runtime.audio import pcm16_to_float
from services.runtime.server import MeshServer
from services.tts.backends.piper import PiperTtsBackend
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.servers import channel_to, running, target_of

riva_client = pytest.importorskip("riva.client", reason="nvidia-riva-client is in the dev group")

from riva.client.proto import riva_tts_pb2  # noqa: E402

pytestmark = pytest.mark.slow

SENTENCE = "The weather in Paris will be sunny tomorrow morning."
SECOND = "Bring a light jacket for the evening."
NATIVE = 22050
RIVA_TTS = "nvidia.riva.tts.RivaSpeechSynthesis"


def seconds(pcm: bytes, rate: int) -> float:
    return len(pcm) / 2 / rate


@pytest.fixture
async def piper_server() -> AsyncIterator[MeshServer]:
    settings = TtsSettings(port=0, max_streams=2, shutdown_grace_s=0.5)
    async with running(TtsService(settings, PiperTtsBackend.from_settings(settings))) as server:
        yield server


@pytest.fixture
async def tts(piper_server: MeshServer) -> AsyncIterator[riva_client.SpeechSynthesisService]:
    auth = riva_client.Auth(uri=target_of(piper_server), use_ssl=False)
    yield riva_client.SpeechSynthesisService(auth)
    auth.channel.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rate", [NATIVE, 16000, 44100])
async def test_offline_synthesis_returns_the_whole_audio_at_the_asked_rate(tts, rate):
    response = await asyncio.to_thread(
        tts.synthesize, SENTENCE, voice_name="joe", language_code="en-US", sample_rate_hz=rate
    )
    duration = seconds(response.audio, rate)
    assert 2.0 < duration < 6.0  # a nine-word sentence at a speaking pace
    audio = pcm16_to_float(response.audio)
    assert float(np.sqrt(np.mean(audio**2))) > 0.02  # speech, not silence
    assert response.meta.text == SENTENCE


@pytest.mark.timeout(60)
async def test_resampled_audio_keeps_its_duration(tts):
    native, low = await asyncio.gather(
        asyncio.to_thread(tts.synthesize, SENTENCE, sample_rate_hz=NATIVE),
        asyncio.to_thread(tts.synthesize, SENTENCE, sample_rate_hz=16000),
    )
    # Piper varies its timing a little from one synthesis to the next (the exact resampling is
    # checked with the tone double in test_riva_protocol.py).
    assert seconds(low.audio, 16000) == pytest.approx(seconds(native.audio, NATIVE), rel=0.1)


@pytest.mark.timeout(60)
async def test_online_synthesis_streams_chunks_for_each_text(tts):
    def online() -> list[riva_tts_pb2.SynthesizeSpeechResponse]:
        # A list of texts is one SynthesizeOnline call with a request per text.
        return list(tts.synthesize_online([SENTENCE, SECOND], sample_rate_hz=NATIVE))

    responses = await asyncio.to_thread(online)
    assert len(responses) >= 3  # streamed: several chunks, not one
    assert all(len(r.audio) <= 2 * NATIVE // 2 for r in responses)  # at most 500 ms each
    streamed = seconds(b"".join(r.audio for r in responses), NATIVE)
    whole = await asyncio.gather(
        *(
            asyncio.to_thread(tts.synthesize, text, sample_rate_hz=NATIVE)
            for text in (SENTENCE, SECOND)
        )
    )
    offline = sum(seconds(r.audio, NATIVE) for r in whole)
    assert streamed == pytest.approx(offline, rel=0.25)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"voice_name": "English-US.Female-1"}, "English-US.Female-1"),
        ({"encoding": riva_client.AudioEncoding.OGGOPUS}, "OGGOPUS"),
        ({"sample_rate_hz": 4000}, "4000"),
        ({"language_code": "fr-FR"}, "fr-FR"),
    ],
)
async def test_bad_requests_get_invalid_argument_naming_the_problem(tts, fields, named):
    arguments = {"sample_rate_hz": NATIVE, **fields}
    with pytest.raises(grpc.RpcError) as offline:
        await asyncio.to_thread(tts.synthesize, SENTENCE, **arguments)
    assert offline.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in offline.value.details()
    with pytest.raises(grpc.RpcError) as online:
        await asyncio.to_thread(lambda: list(tts.synthesize_online(SENTENCE, **arguments)))
    assert online.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(60)
async def test_config_and_health_cover_the_riva_service(tts, piper_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    described = await asyncio.to_thread(
        tts.stub.GetRivaSynthesisConfig, riva_tts_pb2.RivaSynthesisConfigRequest()
    )
    (voice,) = described.model_config
    assert voice.parameters["voice_name"] == "joe"
    assert voice.parameters["sample_rate"] == str(NATIVE)
    async with channel_to(piper_server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=RIVA_TTS))
        assert status.status == health_pb2.HealthCheckResponse.SERVING

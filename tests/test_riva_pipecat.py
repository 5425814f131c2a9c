"""Pipecat's own NVIDIA (Riva) services pointed at the mesh's ASR and TTS servers.

`NvidiaSTTService` and `NvidiaTTSService` (pipecat-ai's `nvidia` extra) run in a real pipeline
(tests/adapter_bench.py) against the real servers with Whisper tiny.en and Piper, in process.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import AsyncIterator

import pytest
from pipecat.frames.frames import TranscriptionFrame, TTSAudioRawFrame, TTSSpeakFrame

from services.asr.backends.whisper import WhisperAsrBackend
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.runtime.server import MeshServer
from tests.adapter_bench import RATE, bench
from tests.helpers import silence_pcm
from tests.servers import ServerProcess, running, start_server_process, target_of
from tests.speech import speech_pcm, wer

pytest.importorskip("riva.client", reason="pipecat-ai[nvidia] is in the dev group")

# Importing pipecat's TTS base warns about pipecat's own deprecated classes (not ours, not used).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from pipecat.services.nvidia.stt import NvidiaSTTService
    from pipecat.services.nvidia.tts import NvidiaTTSService

pytestmark = pytest.mark.slow

BOOK = "Please book a table for two at seven tonight."
# Not NVIDIA's cloud: no function id to route by, and no TLS on the local mesh.
LOCAL = {"function_id": "", "model_name": ""}


@pytest.fixture
async def asr_server() -> AsyncIterator[MeshServer]:
    settings = AsrSettings(port=0, shutdown_grace_s=0.5)
    async with running(AsrService(settings, WhisperAsrBackend.from_settings(settings))) as server:
        yield server


@pytest.fixture
async def tts_server() -> AsyncIterator[ServerProcess]:
    # A child process: NvidiaTTSService fetches the synthesis config with a blocking call on the
    # event loop at setup, which would deadlock a server running on the same loop.
    argv = [sys.executable, "-m", "services.tts", "--port", "0", "--shutdown-grace-s", "0.5"]
    server = await start_server_process(argv)
    try:
        await server.wait_serving(60)
        yield server
    finally:
        await server.stop()


@pytest.mark.timeout(90)
async def test_pipecat_nvidia_stt_transcribes_through_the_mesh(asr_server):
    stt = NvidiaSTTService(server=target_of(asr_server), use_ssl=False, model_function_map=LOCAL)
    async with bench(stt) as b:
        await b.say(silence_pcm(0.3) + speech_pcm(BOOK) + silence_pcm(1.0))
        # Pipecat sends no end of utterance: the server's endpointing produced the final.
        final = await b.down.wait_for(TranscriptionFrame, 30)
    assert wer(BOOK, final.text) <= 0.2, final.text


@pytest.mark.timeout(90)
async def test_pipecat_nvidia_tts_speaks_through_the_mesh(tts_server):
    tts = NvidiaTTSService(
        server=tts_server.target,
        use_ssl=False,
        settings=NvidiaTTSService.Settings(voice="joe"),
        sample_rate=RATE,
        model_function_map=LOCAL,
    )
    async with bench(tts) as b:
        started = time.perf_counter()
        await b.send(TTSSpeakFrame(BOOK))
        await b.down.wait_for(TTSAudioRawFrame, 30)
        first_audio_s = time.perf_counter() - started
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            frames = b.down.all(TTSAudioRawFrame)
            if sum(len(f.audio) for f in frames) / 2 / RATE >= 1.8:
                break
            await b.down.wait_for(TTSAudioRawFrame, 30, count=len(frames) + 1)
    frames = b.down.all(TTSAudioRawFrame)
    assert {f.sample_rate for f in frames} == {RATE}
    assert 1.8 <= sum(len(f.audio) for f in frames) / 2 / RATE < 6.0
    assert first_audio_s < 5.0

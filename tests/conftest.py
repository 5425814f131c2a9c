"""Fixtures: real grpc.aio servers on free ports, hosting servicers with test-double backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from nemotron.speech.v1 import asr_pb2_grpc, llm_pb2_grpc, tts_pb2_grpc
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.server import MeshServer
from services.runtime.service import MeshService
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.doubles import CountingAsrBackendDouble, ScriptedLlmBackendDouble, ToneTtsBackendDouble


@asynccontextmanager
async def running(service: MeshService, wait: bool = True) -> AsyncIterator[MeshServer]:
    """Start `service` on a free loopback port; stop it afterwards."""
    server = MeshServer(service)
    await server.start()
    try:
        if wait:
            await server.wait_loaded()
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def channel_to(server: MeshServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture
def asr_backend() -> CountingAsrBackendDouble:
    return CountingAsrBackendDouble()


@pytest.fixture
async def asr_server(asr_backend: CountingAsrBackendDouble) -> AsyncIterator[MeshServer]:
    settings = AsrSettings(port=0, max_streams=4, max_utterance_s=2.0, shutdown_grace_s=0.5)
    async with running(AsrService(settings, asr_backend)) as server:
        yield server


@pytest.fixture
async def asr_stub(asr_server: MeshServer) -> AsyncIterator[asr_pb2_grpc.AsrServiceStub]:
    async with channel_to(asr_server) as channel:
        yield asr_pb2_grpc.AsrServiceStub(channel)


@pytest.fixture
def tts_backend() -> ToneTtsBackendDouble:
    return ToneTtsBackendDouble(word_delay_s=0.01)


@pytest.fixture
async def tts_server(tts_backend: ToneTtsBackendDouble) -> AsyncIterator[MeshServer]:
    settings = TtsSettings(port=0, max_streams=4, max_text_chars=2000, shutdown_grace_s=0.5)
    async with running(TtsService(settings, tts_backend)) as server:
        yield server


@pytest.fixture
async def tts_stub(tts_server: MeshServer) -> AsyncIterator[tts_pb2_grpc.TtsServiceStub]:
    async with channel_to(tts_server) as channel:
        yield tts_pb2_grpc.TtsServiceStub(channel)


REPLY = (
    "Sure, I can help with that today. The weather in Paris is mild, around 18 degrees. "
    "Dr. Smith recommends a light jacket. Anything else?"
)


@pytest.fixture
def llm_backend() -> ScriptedLlmBackendDouble:
    return ScriptedLlmBackendDouble(REPLY, token_delay_s=0.001)


@pytest.fixture
async def llm_server(llm_backend: ScriptedLlmBackendDouble) -> AsyncIterator[MeshServer]:
    settings = LlmSettings(port=0, max_streams=4, shutdown_grace_s=0.5, continue_timeout_s=5)
    async with running(LlmService(settings, llm_backend)) as server:
        yield server


@pytest.fixture
async def llm_stub(llm_server: MeshServer) -> AsyncIterator[llm_pb2_grpc.LlmServiceStub]:
    async with channel_to(llm_server) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)

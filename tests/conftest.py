"""Fixtures: real grpc.aio servers on free ports, hosting servicers with test-double backends.

Only fixtures live here; what tests import lives in tests/servers.py, doubles.py and helpers.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nemotron.speech.v1 import asr_pb2_grpc, llm_pb2_grpc, tts_pb2_grpc
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.server import MeshServer
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.doubles import (
    REPLY,
    CountingAsrBackendDouble,
    OtlpReceiverDouble,
    ScriptedLlmBackendDouble,
    ToneTtsBackendDouble,
)
from tests.servers import channel_to, running, serving_double

# tests/test_stack_cli.py still imports REPLY and running from here; they live in tests.doubles
# and tests.servers.


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


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[OtlpReceiverDouble, str]]:
    """An OTLP trace receiver double on a free port, and its target."""
    double = OtlpReceiverDouble()
    async with serving_double(double.register) as target:
        yield double, target

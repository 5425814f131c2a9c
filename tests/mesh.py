"""The three real servers with the embedded CPU backends, in process on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from clients.targets import Targets
from services.asr.backends.whisper import WhisperAsrBackend
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.backends.llama_cpp import LlamaCppLlmBackend
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.tts.backends.piper import PiperTtsBackend
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.servers import running


@asynccontextmanager
async def real_mesh() -> AsyncIterator[Targets]:
    """Whisper tiny.en, SmolLM2 and Piper joe behind the real servicers."""
    asr = AsrSettings(port=0, shutdown_grace_s=0.5)
    tts = TtsSettings(port=0, shutdown_grace_s=0.5)
    llm = LlmSettings(port=0, shutdown_grace_s=0.5, context_window=2048, slots=1)
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(running(service))
            for service in (
                AsrService(asr, WhisperAsrBackend.from_settings(asr)),
                TtsService(tts, PiperTtsBackend.from_settings(tts)),
                LlmService(llm, LlamaCppLlmBackend.from_settings(llm)),
            )
        ]
        yield Targets(*(f"127.0.0.1:{server.port}" for server in servers))

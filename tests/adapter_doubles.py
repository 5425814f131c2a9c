"""More adapter test doubles: a server that refuses every call, a call whose writes fail.

The stalled, paced and late-audio servers live in tests/test_bots_adapters.py beside the tests
that grew them; these serve the tests of the shared call base (bots/reconnecting.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from nemotron.speech.v1 import asr_pb2_grpc, tts_pb2_grpc


class RefusingServerDouble(asr_pb2_grpc.AsrServiceServicer, tts_pb2_grpc.TtsServiceServicer):
    """Ends every ASR and TTS call with `code` as soon as it opens, and counts the calls."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.opened = 0

    async def _refuse(self, context: grpc.aio.ServicerContext) -> None:
        self.opened += 1
        await context.abort(self.code, f"refused by the double ({self.code.name})")

    async def StreamingRecognize(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await self._refuse(context)

    async def Synthesize(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await self._refuse(context)

    def register(self, server: grpc.aio.Server) -> None:
        asr_pb2_grpc.add_AsrServiceServicer_to_server(self, server)
        tts_pb2_grpc.add_TtsServiceServicer_to_server(self, server)


class WritesFailAfterConfigCall:
    """Wraps a real call; every write after the config fails, as a broken transport might.

    Reads still work, so nothing but the writer's own failure can end the call.
    """

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call
        self.failed_writes = 0

    async def write(self, request: Any) -> None:
        if request.HasField("config"):
            await self._call.write(request)
            return
        self.failed_writes += 1
        await asyncio.sleep(0)
        raise RuntimeError("the transport dropped a write")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

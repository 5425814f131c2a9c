"""Test doubles for the adapter tests: servers that misbehave, and adapters that watch or fail.

The misbehaving servers are raw servicers (served with tests.servers.serving_double) that stall,
pace their answers, send stale audio or refuse every call; `asr_service` and friends are the mesh's
real servicers around backend doubles. The adapter subclasses count the writer tasks left when a
call ends, or make every write after the config fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bots.stt import GrpcSTTService
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, llm_pb2, llm_pb2_grpc, tts_pb2, tts_pb2_grpc
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.adapter_bench import RATE
from tests.doubles import CountingAsrBackendDouble, ScriptedLlmBackendDouble, ToneTtsBackendDouble
from tests.helpers import tone_pcm


def asr_service(port: int) -> AsrService:
    settings = AsrSettings(port=port, max_streams=4, max_utterance_s=5.0, shutdown_grace_s=0)
    return AsrService(settings, CountingAsrBackendDouble())


def tts_service(port: int, backend: ToneTtsBackendDouble, max_text_chars: int = 2000) -> TtsService:
    settings = TtsSettings(
        port=port, max_streams=4, max_text_chars=max_text_chars, shutdown_grace_s=0
    )
    return TtsService(settings, backend)


def llm_service(port: int) -> LlmService:
    settings = LlmSettings(port=port, max_streams=4, shutdown_grace_s=0, continue_timeout_s=5)
    return LlmService(settings, ScriptedLlmBackendDouble("Hello there. How are you?"))


class StalledServerDouble(
    asr_pb2_grpc.AsrServiceServicer,
    llm_pb2_grpc.LlmServiceServicer,
    tts_pb2_grpc.TtsServiceServicer,
):
    """Accepts every call of the three services, reads what it is sent, and never answers.

    With `ready=True` the ASR call answers its config with `ready` and then goes deaf: a server
    that takes audio and finalizes but never produces a transcript.
    """

    def __init__(self, ready: bool = False) -> None:
        self.ready = ready
        self.opened = 0
        self.cancelled = 0
        self.requests: list[Any] = []

    async def _stall(self, requests: AsyncIterator[Any], context: Any) -> None:
        self.opened += 1
        try:
            async for request in requests:
                self.requests.append(request)
                if self.ready and request.WhichOneof("request") == "config":
                    ready = asr_pb2.RecognizerReady(session_id=f"deaf-{self.opened}")
                    await context.write(asr_pb2.StreamingRecognizeResponse(ready=ready))
            await asyncio.Event().wait()  # half-closed: still no answer
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def StreamingRecognize(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await self._stall(request_iterator, context)

    async def GenerateChunks(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await self._stall(request_iterator, context)

    async def Synthesize(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await self._stall(request_iterator, context)

    def register(self, server: grpc.aio.Server) -> None:
        asr_pb2_grpc.add_AsrServiceServicer_to_server(self, server)
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self, server)
        tts_pb2_grpc.add_TtsServiceServicer_to_server(self, server)


class PacedLlmDouble(llm_pb2_grpc.LlmServiceServicer):
    """Sends chunk 0 at once and chunk N+1 only on `continue_generation` for chunk N; records all.

    Unlike the real servicer it never times out waiting, so a missing or wrong continue shows as
    exactly that, and it records whether the client cancelled its call.
    """

    CHUNKS = ("First sentence.", " Second sentence.", " Third sentence.")

    def __init__(self) -> None:
        self.starts: list[str] = []
        self.continues: list[int] = []
        self.cancelled = 0

    async def GenerateChunks(self, request_iterator, context):  # type: ignore[no-untyped-def]
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if kind == "start":
                    self.starts.append(request.start.request_id)
                    await context.write(self._chunk(0))
                elif kind == "continue_generation":
                    index = request.continue_generation.chunk_index
                    self.continues.append(index)
                    if index + 1 < len(self.CHUNKS):
                        await context.write(self._chunk(index + 1))
                    else:
                        done = llm_pb2.GenerationDone(finish_reason=llm_pb2.FINISH_REASON_STOP)
                        await context.write(llm_pb2.GenerateChunksResponse(done=done))
                        return
            await asyncio.Event().wait()  # a client's cancel ends the requests first
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def register(self, server: grpc.aio.Server) -> None:
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self, server)

    def _chunk(self, index: int) -> llm_pb2.GenerateChunksResponse:
        text = self.CHUNKS[index]
        return llm_pb2.GenerateChunksResponse(
            chunk=llm_pb2.TextChunk(index=index, text=text, ends_sentence=True)
        )


class LateAudioTtsDouble(tts_pb2_grpc.TtsServiceServicer):
    """Speaks each segment as two tone chunks, except "hold", which stops after its first chunk.

    On `cancel` it still sends audio of the cancelled stream: one chunk before acknowledging (it
    was in flight) and one after, out of order, as a buggy or reordering server might; and it
    repeats the stale chunk after the next stream is created.
    """

    TONE = tone_pcm(0.02)

    async def Synthesize(self, request_iterator, context):  # type: ignore[no-untyped-def]
        streams = 0
        stream = cancelled = held = ""
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "text":
                segment = request.text
                if not stream:
                    streams += 1
                    stream = f"stream-{streams}"
                    created = tts_pb2.StreamCreated(stream_id=stream, sample_rate_hz=RATE)
                    await context.write(tts_pb2.SynthesizeResponse(stream_created=created))
                    if cancelled:
                        await context.write(self._audio(cancelled, held))
                await context.write(self._audio(stream, segment.segment_id))
                if segment.text == "hold":
                    held = segment.segment_id
                    continue
                await context.write(self._audio(stream, segment.segment_id))
                complete = tts_pb2.SegmentComplete(
                    stream_id=stream, segment_id=segment.segment_id, audio_ms=40
                )
                await context.write(tts_pb2.SynthesizeResponse(segment_complete=complete))
            elif kind == "cancel":
                cancelled, stream = stream, ""
                await context.write(self._audio(cancelled, held))
                ack = tts_pb2.StreamCancelled(stream_id=cancelled, dropped_segments=1)
                await context.write(tts_pb2.SynthesizeResponse(cancelled=ack))
                await context.write(self._audio(cancelled, held))

    def register(self, server: grpc.aio.Server) -> None:
        tts_pb2_grpc.add_TtsServiceServicer_to_server(self, server)

    def _audio(self, stream: str, segment_id: str) -> tts_pb2.SynthesizeResponse:
        chunk = tts_pb2.AudioChunk(stream_id=stream, segment_id=segment_id, audio=self.TONE)
        return tts_pb2.SynthesizeResponse(audio=chunk)


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


def writers_running() -> int:
    """The adapters' outbox writer tasks that are still running."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if task.get_coro().__qualname__.endswith("._write_all") and not task.done()
    )


class WriterWatchingSTT(GrpcSTTService):
    """Counts, each time a call ends, the outbox writer tasks still running."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writers_at_close: list[int] = []

    async def _on_close(self) -> None:
        self.writers_at_close.append(writers_running())
        await super()._on_close()


class WriteFailingSTT(GrpcSTTService):
    """Its calls' writes fail after the config."""

    def _new_call(self, channel: grpc.aio.Channel) -> Any:
        self.call = WritesFailAfterConfigCall(super()._new_call(channel))
        return self.call

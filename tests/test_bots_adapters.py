"""The three Pipecat adapters against servers that are down, restart, stall or misbehave.

Each adapter runs in a real Pipecat pipeline (recording source -> adapter -> recording sink)
against real grpc.aio servers: the mesh's servicers with test-double backends, or raw servers
written here (named as doubles) where a test needs a server to stall or to answer in a way the
real servicers never would. No model is loaded; the whole file runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import pytest
from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from bots.frames import LLMChunkFrame, SegmentCompleteFrame, segment_id_of
from bots.llm import GrpcChunkedLLMService
from bots.stt import GrpcSTTService
from bots.tts import GrpcTTSService
from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, llm_pb2, llm_pb2_grpc, tts_pb2, tts_pb2_grpc
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.server import MeshServer
from services.tts.backend import SynthesisMode
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.adapter_doubles import RefusingServerDouble, WritesFailAfterConfigCall
from tests.conftest import running
from tests.doubles import CountingAsrBackendDouble, ScriptedLlmBackendDouble, ToneTtsBackendDouble
from tests.helpers import frames, silence_pcm, tone_pcm

RATE = 16000
DOWN = FrameDirection.DOWNSTREAM
UP = FrameDirection.UPSTREAM


# ---- a pipeline around one adapter -------------------------------------------------------------


class Recorder(FrameProcessor):
    """Passes every frame on and keeps those travelling in `direction`, with their arrival time."""

    def __init__(self, direction: FrameDirection) -> None:
        super().__init__()
        self.direction = direction
        self.seen: list[tuple[float, Frame]] = []
        self._changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction and not isinstance(frame, StartFrame):
            self.seen.append((time.perf_counter(), frame))
            self._changed.set()
        await self.push_frame(frame, direction)

    def all(self, kind: type[Frame]) -> list[Any]:
        return [frame for _, frame in self.seen if isinstance(frame, kind)]

    def at(self, kind: type[Frame]) -> float:
        """When the first frame of `kind` arrived."""
        return next(at for at, frame in self.seen if isinstance(frame, kind))

    async def wait_for(
        self,
        kind: type[Frame],
        timeout_s: float,
        count: int = 1,
        where: Callable[[Any], bool] = lambda _: True,
    ) -> Any:
        """The `count`th frame of `kind` (matching `where`), waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [frame for frame in self.all(kind) if where(frame)]
            if len(found) >= count:
                return found[count - 1]
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = ", ".join(type(frame).__name__ for _, frame in self.seen[-30:])
                raise AssertionError(
                    f"{len(found)} of {count} {kind.__name__} in {timeout_s:g} s; saw: {seen}"
                )
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass


class Bench:
    """One adapter between a recording source (upstream frames) and sink (downstream frames)."""

    def __init__(self, worker: PipelineWorker, source: Recorder, sink: Recorder) -> None:
        self.worker = worker
        self.up = source
        self.down = sink

    async def send(self, *frames_: Frame, direction: FrameDirection = DOWN) -> None:
        for frame in frames_:
            await self.worker.queue_frame(frame, direction)

    async def say(self, pcm: bytes) -> None:
        """Stream `pcm` in 20 ms frames, ten times faster than real time."""
        for chunk in frames(pcm, RATE):
            await self.send(InputAudioRawFrame(audio=chunk, sample_rate=RATE, num_channels=1))
            await asyncio.sleep(0.002)

    def errors(self) -> list[str]:
        return [frame.error for frame in self.up.all(ErrorFrame)]


@asynccontextmanager
async def bench(adapter: FrameProcessor) -> AsyncIterator[Bench]:
    """Run `adapter` in a real pipeline until the block ends."""
    source, sink = Recorder(UP), Recorder(DOWN)
    worker = PipelineWorker(
        Pipeline([source, adapter, sink]),
        params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
        cancel_on_idle_timeout=False,
        enable_rtvi=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker: PipelineWorker, _frame: Frame) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(started.wait(), 5)
        yield Bench(worker, source, sink)
    finally:
        await worker.cancel()
        await asyncio.wait_for(task, 10)


async def until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Wait for a condition on state the test does not get frames for (a double's counters)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@contextmanager
def captured_logs(level: str = "WARNING") -> Iterator[list[str]]:
    """The adapters' loguru messages at `level` and above, while the block runs."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level=level, format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def free_port() -> int:
    """A port nothing listens on now, for a server that starts later."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def is_silence(frame: TTSAudioRawFrame) -> bool:
    return not any(frame.audio)


# ---- servers: the mesh's servicers with backend doubles ----------------------------------------


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


def target(server: MeshServer) -> str:
    return f"127.0.0.1:{server.port}"


# ---- raw servers that misbehave ----------------------------------------------------------------


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

    def _audio(self, stream: str, segment_id: str) -> tts_pb2.SynthesizeResponse:
        chunk = tts_pb2.AudioChunk(stream_id=stream, segment_id=segment_id, audio=self.TONE)
        return tts_pb2.SynthesizeResponse(audio=chunk)


@asynccontextmanager
async def serving_double(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[str]:
    """A bare grpc.aio server on a free port with a double registered; yields its target."""
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def llm_context(text: str = "Hello?") -> LLMContextFrame:
    return LLMContextFrame(context=LLMContext(messages=[{"role": "user", "content": text}]))


def chunk(request_id: str, index: int, text: str, ends_sentence: bool = True) -> LLMChunkFrame:
    return LLMChunkFrame(
        text=text, request_id=request_id, chunk_index=index, ends_sentence=ends_sentence
    )


def after(recorder: Recorder, kind: type[Frame]) -> list[Frame]:
    """The frames `recorder` saw after the first one of `kind`."""
    start = recorder.at(kind)
    return [frame for at, frame in recorder.seen if at > start]


# ---- 1. a server that is down at start ---------------------------------------------------------


@pytest.mark.timeout(20)
async def test_stt_retries_while_the_server_is_down_and_connects_once_it_is_up():
    port = free_port()
    stt = GrpcSTTService(target=f"127.0.0.1:{port}")
    with captured_logs() as logs:
        async with bench(stt) as b:
            await until(
                lambda: sum(f"127.0.0.1:{port}: UNAVAILABLE" in line for line in logs) >= 2,
                5,
                "two logged, retried connection failures",
            )
            assert not stt.connected
            async with running(asr_service(port)):
                await until(lambda: stt.connected, 10, "the STT to connect")
                await b.say(tone_pcm(0.3))
                await b.send(UserStoppedSpeakingFrame())
                await b.down.wait_for(UserStoppedSpeakingFrame, 5)
    [final] = b.down.all(TranscriptionFrame)
    assert final.text == "tick tick tick" and final.finalized
    assert b.errors() == []


@pytest.mark.timeout(20)
async def test_tts_retries_while_the_server_is_down_and_speaks_once_it_is_up():
    port = free_port()
    backend = ToneTtsBackendDouble(word_delay_s=0.01)
    tts = GrpcTTSService(target=f"127.0.0.1:{port}", segment_timeout_s=10)
    with captured_logs() as logs:
        async with bench(tts) as b:
            await b.send(
                LLMFullResponseStartFrame(),
                chunk("r1", 0, "Hello there."),
                LLMFullResponseEndFrame(),
            )
            await until(
                lambda: any(f"127.0.0.1:{port}: UNAVAILABLE" in line for line in logs),
                5,
                "a logged, retried connection failure",
            )
            async with running(tts_service(port, backend)):
                await b.down.wait_for(LLMFullResponseEndFrame, 10)
    assert [job.text for job in backend.jobs] == ["Hello there."]
    assert [f.segment_id for f in b.up.all(SegmentCompleteFrame)] == ["r1/0"]
    assert b.down.all(TTSAudioRawFrame)
    assert b.errors() == []


@pytest.mark.timeout(20)
async def test_llm_reports_a_clear_error_while_the_server_is_down_and_answers_once_it_is_up():
    port = free_port()
    llm = GrpcChunkedLLMService(
        target=f"127.0.0.1:{port}", wait_for_continue=False, chunk_timeout_s=2
    )
    async with bench(llm) as b:
        await b.send(llm_context())
        await b.down.wait_for(LLMFullResponseEndFrame, 5)
        [error] = b.errors()
        assert "UNAVAILABLE" in error and f"127.0.0.1:{port}" in error
        assert b.down.all(LLMChunkFrame) == []
        async with running(llm_service(port)):
            await b.send(llm_context("And now?"))
            await b.down.wait_for(LLMFullResponseEndFrame, 5, count=2)
    assert "".join(f.text for f in b.down.all(LLMChunkFrame)) == "Hello there. How are you?"
    assert len(b.errors()) == 1


# ---- 2. a server restart mid-session -----------------------------------------------------------


@pytest.mark.timeout(20)
async def test_stt_reopens_its_call_when_the_server_restarts():
    port = free_port()
    stt = GrpcSTTService(target=f"127.0.0.1:{port}")
    async with bench(stt) as b:
        async with running(asr_service(port)):
            await until(lambda: stt.connected, 5, "the STT to connect")
            first_session = stt.session_id
            await b.say(tone_pcm(0.3))
            await b.down.wait_for(InterimTranscriptionFrame, 5)
        await until(lambda: not stt.connected, 5, "the STT to notice the restart")
        interims = len(b.down.all(InterimTranscriptionFrame))
        async with running(asr_service(port)):
            await until(lambda: stt.connected, 10, "the STT to re-open its call")
            assert stt.session_id != first_session
            await b.say(tone_pcm(0.2))
            await b.send(UserStoppedSpeakingFrame())
            await b.down.wait_for(UserStoppedSpeakingFrame, 5)
    assert len(b.down.all(InterimTranscriptionFrame)) > interims
    [final] = b.down.all(TranscriptionFrame)
    assert final.text == "tick tick" and final.finalized  # the new call's audio only
    assert b.errors() == []


LONG = "one two three four five six seven eight nine ten"


@pytest.mark.timeout(20)
async def test_tts_reopens_its_call_and_resends_the_unfinished_segment_when_the_server_restarts():
    port = free_port()
    first, second = ToneTtsBackendDouble(word_delay_s=0.1), ToneTtsBackendDouble(word_delay_s=0.01)
    tts = GrpcTTSService(target=f"127.0.0.1:{port}", segment_timeout_s=10)
    async with bench(tts) as b:
        async with running(tts_service(port, first)):
            await b.send(
                LLMFullResponseStartFrame(), chunk("r1", 0, LONG), LLMFullResponseEndFrame()
            )
            await b.down.wait_for(TTSAudioRawFrame, 5)
        async with running(tts_service(port, second)):
            await b.down.wait_for(LLMFullResponseEndFrame, 10)
    assert " ".join(job.text for job in second.jobs).split() == LONG.split()
    assert [f.segment_id for f in b.up.all(SegmentCompleteFrame)] == ["r1/0"]
    assert b.errors() == []


@pytest.mark.timeout(20)
async def test_tts_interruption_after_a_restart_cancels_the_resent_segment():
    port = free_port()
    first, second = ToneTtsBackendDouble(word_delay_s=0.1), ToneTtsBackendDouble(word_delay_s=0.1)
    tts = GrpcTTSService(target=f"127.0.0.1:{port}", segment_timeout_s=3)
    async with bench(tts) as b:
        async with running(tts_service(port, first)):
            await b.send(LLMFullResponseStartFrame(), chunk("r1", 0, LONG))
            await b.down.wait_for(TTSAudioRawFrame, 5)
        async with running(tts_service(port, second)):
            await until(lambda: second.jobs, 10, "the segment to be re-sent")
            await b.send(InterruptionFrame())
            await b.down.wait_for(InterruptionFrame, 5)
            await b.send(
                LLMFullResponseStartFrame(), chunk("r2", 0, "Short."), LLMFullResponseEndFrame()
            )
            await b.down.wait_for(LLMFullResponseEndFrame, 5)
    assert [f.segment_id for f in b.up.all(SegmentCompleteFrame)] == ["r2/0"]
    late = [
        f.context_id for f in after(b.down, InterruptionFrame) if isinstance(f, TTSAudioRawFrame)
    ]
    assert set(late) == {"r2/0"}
    assert b.errors() == []


# ---- 3. a stalled server -----------------------------------------------------------------------


@pytest.mark.timeout(15)
async def test_stt_reopens_a_call_whose_server_never_answers():
    stalled = StalledServerDouble()
    async with serving_double(stalled.register) as address:
        stt = GrpcSTTService(target=address, ready_timeout_s=0.3)
        with captured_logs() as logs:
            async with bench(stt) as b:
                await until(lambda: stalled.opened >= 2, 5, "a second call")
                await until(lambda: stalled.cancelled >= 1, 5, "the first call to be cancelled")
                assert not stt.connected
    assert any("no answer within the deadline" in line for line in logs)
    assert b.errors() == []


@pytest.mark.timeout(15)
async def test_llm_ends_the_response_with_an_error_when_the_server_stalls():
    stalled = StalledServerDouble()
    async with serving_double(stalled.register) as address:
        llm = GrpcChunkedLLMService(target=address, chunk_timeout_s=0.3)
        async with bench(llm) as b:
            sent = time.perf_counter()
            await b.send(llm_context())
            await b.down.wait_for(LLMFullResponseEndFrame, 3)
            await until(lambda: stalled.cancelled == 1, 3, "the server to see the call cancelled")
            assert [type(f) for f in b.down.all(Frame)] == [
                LLMFullResponseStartFrame,
                LLMFullResponseEndFrame,
            ]
    assert b.down.at(LLMFullResponseEndFrame) - sent >= 0.3
    [error] = b.errors()
    assert "deadline" in error


@pytest.mark.timeout(15)
async def test_tts_gives_up_on_a_response_when_the_server_stalls():
    stalled = StalledServerDouble()
    async with serving_double(stalled.register) as address:
        tts = GrpcTTSService(target=address, segment_timeout_s=0.5)
        async with bench(tts) as b:
            await until(lambda: stalled.opened == 1, 3, "the TTS to open its call")
            sent = time.perf_counter()
            await b.send(
                LLMFullResponseStartFrame(),
                chunk("r1", 0, "Hello there."),
                LLMFullResponseEndFrame(),
            )
            await b.down.wait_for(LLMFullResponseEndFrame, 3)
    assert 0.5 <= b.down.at(LLMFullResponseEndFrame) - sent < 2.0
    assert [r.text.segment_id for r in stalled.requests if r.HasField("text")] == ["r1/0"]
    assert b.down.all(TTSAudioRawFrame) == []
    [error] = b.errors()
    assert "did not complete 1 segment" in error


# ---- 4. LLM: continue by segment id; interruption ----------------------------------------------


def paced_llm() -> tuple[PacedLlmDouble, Callable[[grpc.aio.Server], None]]:
    paced = PacedLlmDouble()
    return paced, lambda server: llm_pb2_grpc.add_LlmServiceServicer_to_server(paced, server)


@pytest.mark.timeout(15)
async def test_llm_sends_continue_only_for_the_segment_id_of_a_chunk_it_received():
    paced, register = paced_llm()
    async with serving_double(register) as address:
        llm = GrpcChunkedLLMService(target=address)
        async with bench(llm) as b:
            await b.send(llm_context())
            first = await b.down.wait_for(LLMChunkFrame, 3)
            assert paced.starts == [first.request_id]
            await b.send(
                SegmentCompleteFrame(segment_id="another-request/0"),
                SegmentCompleteFrame(segment_id=segment_id_of(first.request_id, 1)),  # not yet
                SegmentCompleteFrame(segment_id=first.request_id),
                direction=UP,
            )
            await asyncio.sleep(0.3)
            assert paced.continues == []
            assert len(b.down.all(LLMChunkFrame)) == 1
            # The right id releases the next chunk, once; a repeat releases nothing.
            for _ in range(2):
                await b.send(SegmentCompleteFrame(segment_id=first.segment_id), direction=UP)
            second = await b.down.wait_for(LLMChunkFrame, 3, count=2)
            await b.send(SegmentCompleteFrame(segment_id=second.segment_id), direction=UP)
            third = await b.down.wait_for(LLMChunkFrame, 3, count=3)
            await b.send(SegmentCompleteFrame(segment_id=third.segment_id), direction=UP)
            await b.down.wait_for(LLMFullResponseEndFrame, 3)
            assert paced.continues == [0, 1, 2]
            # A late completion of the last response releases nothing in the next one.
            await b.send(llm_context("Again?"))
            fourth = await b.down.wait_for(LLMChunkFrame, 3, count=4)
            assert fourth.request_id != first.request_id and fourth.chunk_index == 0
            await b.send(SegmentCompleteFrame(segment_id=first.segment_id), direction=UP)
            await asyncio.sleep(0.3)
            assert paced.continues == [0, 1, 2]
    assert b.errors() == []


@pytest.mark.timeout(15)
async def test_llm_interruption_cancels_the_call():
    paced, register = paced_llm()
    async with serving_double(register) as address:
        llm = GrpcChunkedLLMService(target=address)
        async with bench(llm) as b:
            await b.send(llm_context())
            first = await b.down.wait_for(LLMChunkFrame, 3)
            await b.send(InterruptionFrame())
            await until(lambda: paced.cancelled == 1, 3, "the server to see the call cancelled")
            # The next turn gets a call of its own.
            await b.send(llm_context("Something else?"))
            next_first = await b.down.wait_for(LLMChunkFrame, 3, count=2)
    assert next_first.request_id != first.request_id
    assert paced.starts == [first.request_id, next_first.request_id]
    assert paced.continues == []
    assert b.errors() == []


# ---- 5. TTS: adaptive mode, sentence pauses, stale audio ---------------------------------------


@pytest.mark.timeout(15)
async def test_tts_streams_the_first_segment_batches_the_rest_and_pauses_after_sentences():
    backend = ToneTtsBackendDouble(word_delay_s=0.01)
    async with running(tts_service(0, backend)) as server:
        tts = GrpcTTSService(target=target(server))
        async with bench(tts) as b:
            await b.send(
                LLMFullResponseStartFrame(),
                chunk("r1", 0, "Alpha one."),
                chunk("r1", 1, " Bravo two,", ends_sentence=False),
                chunk("r1", 2, " Charlie three."),
                LLMFullResponseEndFrame(),
            )
            await b.down.wait_for(LLMFullResponseEndFrame, 5)
            await b.send(
                LLMFullResponseStartFrame(),
                chunk("r2", 0, "Delta four."),
                LLMFullResponseEndFrame(),
            )
            await b.down.wait_for(LLMFullResponseEndFrame, 5, count=2)
    modes = {job.text.split()[0].strip(".,").lower(): job.mode for job in backend.jobs}
    assert modes == {
        "alpha": SynthesisMode.STREAM,
        "bravo": SynthesisMode.BATCH,
        "charlie": SynthesisMode.BATCH,
        "delta": SynthesisMode.STREAM,
    }
    audio = b.down.all(TTSAudioRawFrame)
    shape: list[tuple[str, str]] = []
    for frame in audio:
        item = (frame.context_id, "pause" if is_silence(frame) else "speech")
        if not shape or shape[-1] != item:
            shape.append(item)
    assert shape == [
        ("r1/0", "speech"),
        ("r1/0", "pause"),
        ("r1/1", "speech"),
        ("r1/2", "speech"),
        ("r1/2", "pause"),
        ("r2/0", "speech"),
        ("r2/0", "pause"),
    ]
    assert all(len(f.audio) == 2 * RATE // 4 for f in audio if is_silence(f))  # 250 ms


@pytest.mark.timeout(15)
async def test_tts_drops_audio_of_a_cancelled_stream_by_its_id():
    late = LateAudioTtsDouble()
    register = lambda server: tts_pb2_grpc.add_TtsServiceServicer_to_server(late, server)  # noqa: E731
    async with serving_double(register) as address:
        tts = GrpcTTSService(target=address, segment_timeout_s=3)
        async with bench(tts) as b:
            await b.send(LLMFullResponseStartFrame(), chunk("r1", 0, "hold"))
            await b.down.wait_for(TTSAudioRawFrame, 3)
            await b.send(InterruptionFrame())
            await b.down.wait_for(InterruptionFrame, 3)
            await b.send(
                LLMFullResponseStartFrame(),
                chunk("r2", 0, "Next answer."),
                LLMFullResponseEndFrame(),
            )
            await b.down.wait_for(LLMFullResponseEndFrame, 3)
    assert [
        f.context_id for f in after(b.down, InterruptionFrame) if isinstance(f, TTSAudioRawFrame)
    ] == [
        "r2/0",
        "r2/0",
        "r2/0",  # its two chunks and the pause after the sentence
    ]
    assert tts.dropped_audio_chunks == 3  # before the ack, after it, after the next stream opened
    assert [f.segment_id for f in b.up.all(SegmentCompleteFrame)] == ["r2/0"]
    assert b.errors() == []


# ---- 6. STT: interim and final results, soft finalize, the held turn end -----------------------


@pytest.mark.timeout(15)
async def test_stt_interims_soft_finalize_and_a_turn_end_held_for_the_final():
    async with running(asr_service(0)) as server:
        stt = GrpcSTTService(target=target(server))
        async with bench(stt) as b:
            await until(lambda: stt.connected, 5, "the STT to connect")
            await b.say(tone_pcm(0.3))
            await b.down.wait_for(InterimTranscriptionFrame, 3, where=lambda f: len(f.text) > 10)
            await b.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
            soft = await b.down.wait_for(
                InterimTranscriptionFrame, 3, where=lambda f: f.result.soft
            )
            assert soft.text == "tick tick tick"
            assert b.down.all(TranscriptionFrame) == []
            await b.say(tone_pcm(0.2) + silence_pcm(0.1))
            await b.send(UserStoppedSpeakingFrame())
            await b.down.wait_for(UserStoppedSpeakingFrame, 3)
    [final] = b.down.all(TranscriptionFrame)
    assert final.text == "tick tick tick tick tick"
    assert final.finalized and final.result.is_final and final.result.utterance_id
    assert b.down.at(TranscriptionFrame) <= b.down.at(UserStoppedSpeakingFrame)
    ordered = [
        f for f in b.down.all(Frame) if isinstance(f, TranscriptionFrame | UserStoppedSpeakingFrame)
    ]
    assert [type(f) for f in ordered] == [TranscriptionFrame, UserStoppedSpeakingFrame]
    assert all(not f.result.is_final for f in b.down.all(InterimTranscriptionFrame))
    assert b.errors() == []


@pytest.mark.timeout(15)
async def test_stt_releases_the_turn_end_after_finalize_timeout_without_a_final():
    deaf = StalledServerDouble(ready=True)
    async with serving_double(deaf.register) as address:
        stt = GrpcSTTService(target=address, finalize_timeout_s=0.3)
        with captured_logs() as logs:
            async with bench(stt) as b:
                await until(lambda: stt.connected, 5, "the STT to connect")
                await b.say(tone_pcm(0.1))
                await b.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
                sent = time.perf_counter()
                await b.send(UserStoppedSpeakingFrame())
                await b.down.wait_for(UserStoppedSpeakingFrame, 3)
    assert 0.3 <= b.down.at(UserStoppedSpeakingFrame) - sent < 2.0  # the timeout, not a hang
    assert b.down.all(TranscriptionFrame) == []
    finalizes = [r.finalize for r in deaf.requests if r.HasField("finalize")]
    assert [f.soft for f in finalizes] == [True, False]
    assert finalizes[1].utterance_id
    assert any("no final transcript" in line for line in logs)


# ---- 7. the shared call: faults, backoff, the writer task --------------------------------------

TOO_LONG = "This segment is far longer than the server's limit on one segment allows."


@pytest.mark.timeout(15)
async def test_tts_fails_only_a_refused_segment_and_speaks_the_next_response():
    backend = ToneTtsBackendDouble(word_delay_s=0.01)
    async with running(tts_service(0, backend, max_text_chars=40)) as server:
        tts = GrpcTTSService(target=target(server), segment_timeout_s=5)
        async with bench(tts) as b:
            await until(lambda: tts.connected, 5, "the TTS to connect")
            await b.send(
                LLMFullResponseStartFrame(), chunk("r1", 0, TOO_LONG), LLMFullResponseEndFrame()
            )
            await b.down.wait_for(LLMFullResponseEndFrame, 3)
            await b.send(
                LLMFullResponseStartFrame(),
                chunk("r2", 0, "Hello there."),
                LLMFullResponseEndFrame(),
            )
            await b.down.wait_for(LLMFullResponseEndFrame, 5, count=2)
    # The refused segment completes with no audio, so an LLM waiting on it goes on.
    completed = [(f.segment_id, f.audio_ms) for f in b.up.all(SegmentCompleteFrame)]
    assert completed[0] == ("r1/0", 0.0)
    assert [segment for segment, _ in completed] == ["r1/0", "r2/0"]
    assert [job.text for job in backend.jobs] == ["Hello there."]
    assert {f.context_id for f in b.down.all(TTSAudioRawFrame)} == {"r2/0"}
    [error] = b.errors()
    assert "r1/0" in error and "INVALID_ARGUMENT" in error
    assert tts.is_usable


@pytest.mark.timeout(20)
async def test_tts_finds_the_refused_one_of_several_segments_in_flight():
    backend = ToneTtsBackendDouble(word_delay_s=0.2)  # no audio before the refusal arrives
    async with running(tts_service(0, backend, max_text_chars=40)) as server:
        tts = GrpcTTSService(target=target(server), segment_timeout_s=10)
        with captured_logs() as logs:
            async with bench(tts) as b:
                await until(lambda: tts.connected, 5, "the TTS to connect")
                await b.send(
                    LLMFullResponseStartFrame(),
                    chunk("r1", 0, "Hello there."),
                    chunk("r1", 1, TOO_LONG),
                    chunk("r1", 2, "Bye now."),
                    LLMFullResponseEndFrame(),
                )
                await b.down.wait_for(LLMFullResponseEndFrame, 10)
    assert any("sending them again one at a time" in line for line in logs)
    completed = {f.segment_id: f.audio_ms for f in b.up.all(SegmentCompleteFrame)}
    assert completed.keys() == {"r1/0", "r1/1", "r1/2"}
    assert completed["r1/1"] == 0.0 and completed["r1/0"] > 0 and completed["r1/2"] > 0
    assert {job.text for job in backend.jobs} == {"Hello there.", "Bye now."}
    assert {f.context_id for f in b.down.all(TTSAudioRawFrame)} == {"r1/0", "r1/2"}
    [error] = b.errors()
    assert "r1/1" in error and "INVALID_ARGUMENT" in error


@pytest.mark.timeout(15)
async def test_tts_ends_the_session_with_one_error_when_its_config_is_refused():
    backend = ToneTtsBackendDouble()
    async with running(tts_service(0, backend)) as server:
        tts = GrpcTTSService(target=target(server), voice="nobody", segment_timeout_s=5)
        async with bench(tts) as b:
            await until(lambda: b.errors(), 5, "the refusal to be reported")
            sent = time.perf_counter()
            await b.send(
                LLMFullResponseStartFrame(), chunk("r1", 0, "Hello."), LLMFullResponseEndFrame()
            )
            await b.down.wait_for(LLMFullResponseEndFrame, 3)
    assert b.down.at(LLMFullResponseEndFrame) - sent < 1.0  # not held for segment_timeout_s
    [error] = b.errors()
    assert "INVALID_ARGUMENT" in error and "unknown voice" in error
    assert not tts.is_usable
    assert backend.jobs == []


ADAPTERS = {
    "stt": lambda address: GrpcSTTService(target=address),
    "tts": lambda address: GrpcTTSService(target=address),
}


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.timeout(15)
async def test_a_non_retryable_status_ends_the_session_with_one_error_and_no_redial(kind):
    refusing = RefusingServerDouble(grpc.StatusCode.FAILED_PRECONDITION)
    async with serving_double(refusing.register) as address:
        adapter = ADAPTERS[kind](address)
        async with bench(adapter) as b:
            await until(lambda: b.errors(), 5, "the refusal to be reported")
            await asyncio.sleep(1.0)
    assert refusing.opened == 1
    [error] = b.errors()
    assert "FAILED_PRECONDITION" in error
    assert not adapter.is_usable


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.timeout(15)
async def test_a_retryable_status_is_retried_with_growing_waits(kind):
    busy = RefusingServerDouble(grpc.StatusCode.RESOURCE_EXHAUSTED)
    async with serving_double(busy.register) as address:
        adapter = ADAPTERS[kind](address)
        async with bench(adapter) as b:
            await until(lambda: busy.opened >= 2, 5, "a retry")
            await asyncio.sleep(1.5)
    # Waits of about 0.2, 0.4, 0.8, 1.6 s: a few calls in the first 2 s or so, not hundreds.
    assert 3 <= busy.opened <= 7
    assert b.errors() == []
    assert adapter.is_usable


def _writers_running() -> int:
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
        self.writers_at_close.append(_writers_running())
        await super()._on_close()


@pytest.mark.timeout(20)
async def test_stt_writer_task_has_ended_whenever_its_call_ends():
    port = free_port()
    stt = WriterWatchingSTT(target=f"127.0.0.1:{port}")
    async with bench(stt) as b:
        async with running(asr_service(port)):
            await until(lambda: stt.connected, 5, "the STT to connect")
            await b.say(tone_pcm(0.2))
        await until(lambda: not stt.connected, 5, "the STT to notice the restart")
        async with running(asr_service(port)):
            await until(lambda: stt.connected, 10, "the STT to re-open its call")
            await b.say(tone_pcm(0.1))
    # The restart ended one call, the pipeline's cancel the other (and failed dials count too).
    assert len(stt.writers_at_close) >= 2
    assert set(stt.writers_at_close) == {0}
    assert _writers_running() == 0


class WriteFailingSTT(GrpcSTTService):
    """Its calls' writes fail after the config."""

    def _new_call(self, channel: grpc.aio.Channel) -> Any:
        self.call = WritesFailAfterConfigCall(super()._new_call(channel))
        return self.call


@pytest.mark.timeout(15)
async def test_stt_a_failed_writer_ends_its_call_and_is_reported():
    deaf = StalledServerDouble(ready=True)  # answers the config, then never a word
    async with serving_double(deaf.register) as address:
        stt = WriteFailingSTT(target=address)
        with captured_logs("ERROR") as logs:
            async with bench(stt) as b:
                await until(lambda: stt.connected, 5, "the STT to connect")
                await b.say(tone_pcm(0.1))
                await until(lambda: deaf.cancelled == 1, 3, "the server to see the call end")
                await until(lambda: b.errors(), 3, "the failure to be reported")
                assert not stt.connected
    assert stt.call.failed_writes == 1
    [error] = b.errors()
    assert "ASR call failed" in error and "the transport dropped a write" in error
    assert any("unexpected error in the ASR call" in line for line in logs)
    assert deaf.opened == 1

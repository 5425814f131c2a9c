"""The three Pipecat adapters against servers that are down, restart, stall or misbehave.

Each adapter runs in a real Pipecat pipeline (recording source -> adapter -> recording sink,
tests/adapter_bench.py) against real grpc.aio servers: the mesh's servicers with test-double
backends, or raw servers (doubles, tests/adapter_doubles.py) where a test needs a server to stall
or to answer in a way the real servicers never would. No model is loaded; the whole file runs in
well under a minute.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from pipecat.frames.frames import (
    Frame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)

from bots.frames import LLMChunkFrame, SegmentCompleteFrame, segment_id_of
from bots.llm import GrpcChunkedLLMService
from bots.stt import GrpcSTTService
from bots.tts import GrpcTTSService
from clients.channel import START_ATTEMPTS
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.tts.backend import SynthesisMode
from tests.adapter_bench import (
    RATE,
    UP,
    after,
    bench,
    captured_logs,
    chunk,
    is_silence,
    llm_context,
    until,
)
from tests.adapter_doubles import (
    LateAudioTtsDouble,
    PacedLlmDouble,
    RefusingServerDouble,
    StalledServerDouble,
    WriteFailingSTT,
    WriterWatchingSTT,
    asr_service,
    llm_service,
    tts_service,
    writers_running,
)
from tests.doubles import ThinkingLlmBackendDouble, ToneTtsBackendDouble
from tests.helpers import silence_pcm, tone_pcm
from tests.servers import free_port, running, serving_double, target_of

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


@pytest.mark.timeout(15)
async def test_llm_sends_continue_only_for_the_segment_id_of_a_chunk_it_received():
    paced = PacedLlmDouble()
    async with serving_double(paced.register) as address:
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
    paced = PacedLlmDouble()
    async with serving_double(paced.register) as address:
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
        tts = GrpcTTSService(target=target_of(server))
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
    async with serving_double(late.register) as address:
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
        stt = GrpcSTTService(target=target_of(server))
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
        tts = GrpcTTSService(target=target_of(server), segment_timeout_s=5)
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
        tts = GrpcTTSService(target=target_of(server), segment_timeout_s=10)
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
        tts = GrpcTTSService(target=target_of(server), voice="nobody", segment_timeout_s=5)
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
    # Waits of about 0.2, 0.4, 0.8, 1.6 s: a few calls in the first 2 s or so, not hundreds;
    # each is tried up to START_ATTEMPTS times by the channel's retry policy (meant for the next
    # replica; here there is only one).
    assert 3 <= busy.opened <= 7 * START_ATTEMPTS
    assert b.errors() == []
    assert adapter.is_usable


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
    assert writers_running() == 0


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


async def test_llm_never_passes_a_models_reasoning_on_to_be_spoken():
    # A model that reasons whatever it is asked: only its answer may reach TTS.
    port = free_port()
    settings = LlmSettings(port=port, max_streams=4, shutdown_grace_s=0, continue_timeout_s=5)
    llm = GrpcChunkedLLMService(
        target=f"127.0.0.1:{port}", wait_for_continue=False, chunk_timeout_s=2
    )
    async with running(LlmService(settings, ThinkingLlmBackendDouble())), bench(llm) as b:
        await b.send(llm_context())
        await b.down.wait_for(LLMFullResponseEndFrame, 5)
    assert "".join(f.text for f in b.down.all(LLMChunkFrame)) == "Seven. Done."
    assert b.errors() == []

"""The Riva-compatible API's contract, with test-double backends (fast; no model is loaded).

Driven with the generated Riva stubs (`riva.proto`, grpc.aio); the tests with NVIDIA's own client
and the real models are tests/test_riva_asr.py, tests/test_riva_tts.py and
tests/test_riva_pipecat.py.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from riva.proto import riva_asr_pb2, riva_asr_pb2_grpc, riva_tts_pb2, riva_tts_pb2_grpc

from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings
from tests.doubles import CountingAsrBackendDouble, LoadGate, ToneTtsBackendDouble
from tests.helpers import read_all, silence_pcm, tone_pcm
from tests.servers import channel_to, running

LINEAR_PCM = 1
StreamReq = riva_asr_pb2.StreamingRecognizeRequest


def config(**fields: object) -> riva_asr_pb2.RecognitionConfig:
    values: dict[str, object] = {
        "encoding": LINEAR_PCM,
        "sample_rate_hertz": 16000,
        "language_code": "en-US",
        "enable_automatic_punctuation": True,
    }
    values.update(fields)
    return riva_asr_pb2.RecognitionConfig(**values)  # type: ignore[arg-type]


def streamed(pcm: bytes, interim: bool = False, **fields: object) -> list[StreamReq]:
    streaming = riva_asr_pb2.StreamingRecognitionConfig(
        config=config(**fields), interim_results=interim
    )
    size = 3200  # 100 ms
    return [StreamReq(streaming_config=streaming)] + [
        StreamReq(audio_content=pcm[i : i + size]) for i in range(0, len(pcm), size)
    ]


@pytest.fixture
async def asr_channel() -> AsyncIterator[grpc.aio.Channel]:
    service = AsrService(AsrSettings(port=0, max_streams=1), CountingAsrBackendDouble())
    async with running(service) as server, channel_to(server) as channel:
        yield channel


@pytest.fixture
def riva_asr(asr_channel: grpc.aio.Channel) -> riva_asr_pb2_grpc.RivaSpeechRecognitionStub:
    return riva_asr_pb2_grpc.RivaSpeechRecognitionStub(asr_channel)


@pytest.fixture
async def riva_tts() -> AsyncIterator[riva_tts_pb2_grpc.RivaSpeechSynthesisStub]:
    service = TtsService(TtsSettings(port=0), ToneTtsBackendDouble())
    async with running(service) as server, channel_to(server) as channel:
        yield riva_tts_pb2_grpc.RivaSpeechSynthesisStub(channel)


def finals(responses: list[riva_asr_pb2.StreamingRecognizeResponse]) -> list[str]:
    return [
        result.alternatives[0].transcript
        for response in responses
        for result in response.results
        if result.is_final
    ]


async def test_the_server_ends_utterances_at_pauses(riva_asr):
    pcm = silence_pcm(0.3) + tone_pcm(1.0) + silence_pcm(1.0) + tone_pcm(0.5) + silence_pcm(0.2)
    responses = await read_all(riva_asr.StreamingRecognize(iter(streamed(pcm))))
    # The first ends after the default 800 ms of silence; the second when the stream does.
    assert finals(responses) == [" ".join(["tick"] * 10), " ".join(["tick"] * 5)]
    processed = [r.results[0].audio_processed for r in responses]
    assert processed == pytest.approx([2.1, 3.0], abs=0.05)


async def test_stop_history_sets_the_pause_that_ends_an_utterance(riva_asr):
    pcm = tone_pcm(0.5) + silence_pcm(0.4) + tone_pcm(0.5) + silence_pcm(1.0)
    default = await read_all(riva_asr.StreamingRecognize(iter(streamed(pcm))))
    short = riva_asr_pb2.EndpointingConfig(stop_history=300)
    split = await read_all(
        riva_asr.StreamingRecognize(iter(streamed(pcm, endpointing_config=short)))
    )
    assert len(finals(default)) == 1 and len(finals(split)) == 2


async def test_interim_results_and_estimated_word_offsets(riva_asr):
    pcm = silence_pcm(0.3) + tone_pcm(0.4) + silence_pcm(1.0)
    requests = streamed(pcm, interim=True, enable_word_time_offsets=True)
    responses = await read_all(riva_asr.StreamingRecognize(iter(requests)))
    results = [result for response in responses for result in response.results]
    assert [r.alternatives[0].transcript for r in results if not r.is_final] == [
        "tick",
        "tick tick",
        "tick tick tick",
        "tick tick tick tick",
    ]
    final = results[-1]
    assert final.is_final and final.stability == 1.0
    words = final.alternatives[0].words
    assert [w.word for w in words] == ["tick"] * 4
    assert words[0].start_time == 300 and words[-1].end_time <= 700
    assert all(a.end_time <= b.start_time for a, b in itertools.pairwise(words))
    assert list(final.alternatives[0].language_code) == ["en-US"]


async def test_offline_recognize_gives_a_result_per_utterance(riva_asr):
    pcm = tone_pcm(0.3) + silence_pcm(1.0) + tone_pcm(0.2)
    response = await riva_asr.Recognize(riva_asr_pb2.RecognizeRequest(config=config(), audio=pcm))
    assert [r.alternatives[0].transcript for r in response.results] == [
        "tick tick tick",
        "tick tick",
    ]


@pytest.mark.parametrize(
    ("requests", "named"),
    [
        ([StreamReq(audio_content=b"\0\0")], "streaming_config"),
        (streamed(b"\0\0" * 10)[:1] * 2, "already sent"),
        (streamed(b"", encoding=3), "MULAW"),
        (streamed(b"", encoding=4), "OGGOPUS"),
        (streamed(b"", encoding=99), "99"),
        (streamed(b"", sample_rate_hertz=11025), "11025"),
        (streamed(b"", language_code="fr-FR"), "fr-FR"),
        (streamed(b"", audio_channel_count=2), "audio_channel_count"),
        (streamed(b"", endpointing_config={"stop_threshold": 2.0}), "stop_threshold"),
        ([*streamed(b"\0\0" * 10)[:1], StreamReq()], "neither audio_content"),
    ],
)
async def test_bad_requests_get_invalid_argument(riva_asr, requests, named):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read_all(riva_asr.StreamingRecognize(iter(requests)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (refused.value.details() or "")


async def test_riva_streams_share_the_servers_stream_limit(asr_channel, riva_asr):
    v1 = asr_pb2_grpc.AsrServiceStub(asr_channel)
    call = v1.StreamingRecognize()
    await call.write(
        asr_pb2.StreamingRecognizeRequest(config=asr_pb2.RecognitionConfig(sample_rate_hz=16000))
    )
    await call.read()  # ready: the one slot is taken
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await riva_asr.Recognize(riva_asr_pb2.RecognizeRequest(config=config(), audio=b"\0\0"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    call.cancel()


async def test_unavailable_while_the_model_loads():
    gate = LoadGate(open_at_start=False)
    service = AsrService(AsrSettings(port=0), CountingAsrBackendDouble(gate))
    async with running(service, wait=False) as server, channel_to(server) as channel:
        stub = riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Recognize(riva_asr_pb2.RecognizeRequest(config=config(), audio=b""))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.event.set()


async def test_reflection_describes_riva_with_its_comments(asr_channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(asr_channel)
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="nvidia.riva.asr.RivaSpeechRecognition"
    )
    async for answer in reflection.ServerReflectionInfo(iter([request])):
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(serialized)
            for serialized in answer.file_descriptor_response.file_descriptor_proto
        ]
        (asr,) = [f for f in files if f.name == "riva/proto/riva_asr.proto"]
        assert asr.source_code_info.location  # the documented copy, comments included


def test_generated_riva_code_is_the_riva_clients_own():
    # Identical descriptors: a server and a Riva client (or Pipecat's) can share a process.
    client = pytest.importorskip("riva.client.proto.riva_asr_pb2")
    from riva.client.proto import riva_tts_pb2 as client_tts

    assert client.RecognitionConfig is riva_asr_pb2.RecognitionConfig
    assert client_tts.SynthesizeSpeechRequest is riva_tts_pb2.SynthesizeSpeechRequest


def tts_request(text: str, **fields: object) -> riva_tts_pb2.SynthesizeSpeechRequest:
    values: dict[str, object] = {"text": text, "language_code": "en-US", "encoding": LINEAR_PCM}
    values.update(fields)
    return riva_tts_pb2.SynthesizeSpeechRequest(**values)  # type: ignore[arg-type]


async def test_synthesize_returns_the_whole_audio_at_the_asked_rate(riva_tts):
    native = await riva_tts.Synthesize(tts_request("one two three"))
    assert len(native.audio) == 2 * 3 * 1600  # 300 ms at the voice's 16 kHz
    low = await riva_tts.Synthesize(tts_request("one two three", sample_rate_hz=8000))
    assert len(low.audio) == pytest.approx(2 * 3 * 800, abs=8)
    other = await riva_tts.Synthesize(tts_request("one", voice_name="low-tone"))
    assert len(other.audio) == 2 * 2205


async def test_synthesize_online_streams_each_request_in_turn(riva_tts):
    requests = [tts_request("one two three"), tts_request("four five")]
    responses = await read_all(riva_tts.SynthesizeOnline(iter(requests)))
    assert len(responses) >= 5  # a chunk per word, as the backend made them
    assert sum(len(r.audio) for r in responses) == 2 * 5 * 1600


async def test_synthesize_online_refuses_a_request_that_changes_the_calls_voice_or_rate(
    riva_tts,
):
    for change, named in (
        ({"sample_rate_hz": 8000}, "sample_rate_hz"),
        ({"voice_name": "low-tone"}, "voice_name"),
    ):
        requests = [tts_request("one"), tts_request("two", **change)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read_all(riva_tts.SynthesizeOnline(iter(requests)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in (refused.value.details() or "")
    # The same settings repeated, as Riva clients send them, are fine.
    same = [tts_request("one", sample_rate_hz=16000), tts_request("two", sample_rate_hz=16000)]
    assert await read_all(riva_tts.SynthesizeOnline(iter(same)))


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"voice_name": "nobody"}, "nobody"),
        ({"encoding": 2}, "FLAC"),
        ({"sample_rate_hz": 96000}, "96000"),
        ({"language_code": "ja-JP"}, "ja-JP"),
    ],
)
async def test_bad_synthesis_requests_get_invalid_argument(riva_tts, fields, named):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await riva_tts.Synthesize(tts_request("hello", **fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as online:
        await read_all(riva_tts.SynthesizeOnline(iter([tts_request("hello", **fields)])))
    assert online.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class _FinalizeRecorder(CountingAsrBackendDouble):
    """Also records the span of every utterance end it is asked to answer."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[float, float]] = []

    async def recognize(self, options, events):  # type: ignore[no-untyped-def]
        async for hypothesis in super().recognize(options, events):
            if hypothesis.answers is not None:
                self.spans.append((hypothesis.answers.start_ms, hypothesis.answers.end_ms))
            yield hypothesis


async def test_silence_between_utterances_is_not_decoded_with_the_next_one():
    backend = _FinalizeRecorder()
    service = AsrService(AsrSettings(port=0), backend)
    async with running(service) as server, channel_to(server) as channel:
        stub = riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel)
        pcm = silence_pcm(5.0) + tone_pcm(0.5) + silence_pcm(1.0)
        responses = await read_all(stub.StreamingRecognize(iter(streamed(pcm))))
    assert finals(responses) == ["tick " * 4 + "tick"]
    # The quiet lead-in went in pieces of about a second; the speech's utterance starts late.
    (speech,) = [span for span in backend.spans if span[0] <= 5000 < span[1]]
    assert 4000 <= speech[0] and speech[1] >= 5500
    assert all(end - start <= 1200 for start, end in backend.spans if (start, end) != speech)


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl comes with the dev group")
async def test_grpcurl_describes_riva_through_reflection():
    service = TtsService(TtsSettings(port=0), ToneTtsBackendDouble())
    async with running(service) as server:
        target = f"127.0.0.1:{server.port}"

        def grpcurl(*args: str) -> str:
            command = ["grpcurl", "-plaintext", *args]
            return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout

        listed = await asyncio.to_thread(grpcurl, target, "list")
        described = await asyncio.to_thread(
            grpcurl, target, "describe", "nvidia.riva.tts.SynthesizeSpeechRequest"
        )
    assert {"nvidia.riva.tts.RivaSpeechSynthesis", "nemotron.speech.v1.TtsService"} <= set(
        listed.split()
    )
    assert "voice_name" in described and "Text to be converted to audio" in described  # comments

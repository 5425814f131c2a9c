"""Traces across processes: one trace per turn, server spans under the bot's client spans.

Three real server processes (test-double engines) export through the real OTLP exporter to a real
OTLP receiver started here (the collector's gRPC TraceService from opentelemetry-proto). The test
plays the bot: a turn span, a client span per stage, W3C context in gRPC metadata (LLM) and in the
per-message trace_context maps (ASR finalize, TTS text).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nemotron.speech.v1 import asr_pb2, asr_pb2_grpc, llm_pb2, llm_pb2_grpc, tts_pb2, tts_pb2_grpc
from nemotron_speech.trace_report import spans_from_otlp_json, summary, turns_of
from services.runtime import telemetry as telemetry_module
from services.runtime import trace_types as names
from tests.helpers import frames, tone_pcm
from tests.servers import ROOT, ServerProcess, start_serve_double


def _carrier(span: trace.Span) -> dict[str, str]:
    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span))
    return carrier


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_one_turn_is_one_trace_across_three_processes(receiver, tmp_path):
    double, collector = receiver
    recorded = tmp_path / "trace.jsonl"
    processes: dict[str, ServerProcess] = {}
    try:
        for service in ("asr", "tts", "llm"):
            env = {
                **os.environ,
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_SERVICE_NAME": f"test-{service}",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                "NEMOTRON_TRACE_FILE": str(recorded),
            }
            processes[service] = await start_serve_double(service, env=env)
        targets = {service: process.target for service, process in processes.items()}
        for process in processes.values():
            await process.wait_serving()

        bot_spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(bot_spans))
        tracer = provider.get_tracer("test-bot")
        client_ttfb = {}
        with tracer.start_as_current_span(names.SPAN_TURN) as turn:
            async with grpc.aio.insecure_channel(targets["asr"]) as channel:
                with tracer.start_as_current_span("stt") as stt:
                    requests = [
                        asr_pb2.StreamingRecognizeRequest(
                            config=asr_pb2.RecognitionConfig(sample_rate_hz=16000)
                        )
                    ]
                    requests += [
                        asr_pb2.StreamingRecognizeRequest(audio=f) for f in frames(tone_pcm(0.3))
                    ]
                    requests.append(
                        asr_pb2.StreamingRecognizeRequest(
                            finalize=asr_pb2.Finalize(
                                utterance_id="u1", trace_context=_carrier(stt)
                            )
                        )
                    )
                    sent = time.perf_counter()
                    call = asr_pb2_grpc.AsrServiceStub(channel).StreamingRecognize(iter(requests))
                    async for response in call:
                        if response.transcript.is_final:
                            client_ttfb["asr"] = 1000 * (time.perf_counter() - sent)
            async with grpc.aio.insecure_channel(targets["llm"]) as channel:
                with tracer.start_as_current_span("llm") as llm:
                    start = llm_pb2.GenerateChunksRequest(
                        start=llm_pb2.StartGeneration(
                            messages=[llm_pb2.ChatMessage(role="user", content="hi")]
                        )
                    )
                    sent = time.perf_counter()
                    call = llm_pb2_grpc.LlmServiceStub(channel).GenerateChunks(
                        iter([start]), metadata=tuple(_carrier(llm).items())
                    )
                    async for response in call:
                        if response.HasField("chunk") and "llm" not in client_ttfb:
                            client_ttfb["llm"] = 1000 * (time.perf_counter() - sent)
            async with grpc.aio.insecure_channel(targets["tts"]) as channel:
                with tracer.start_as_current_span("tts") as tts:
                    requests = [
                        tts_pb2.SynthesizeRequest(config=tts_pb2.SynthesisConfig()),
                        tts_pb2.SynthesizeRequest(
                            text=tts_pb2.TextSegment(
                                segment_id="s1", text="hello there", trace_context=_carrier(tts)
                            )
                        ),
                        tts_pb2.SynthesizeRequest(close=tts_pb2.CloseStream()),
                    ]
                    sent = time.perf_counter()
                    call = tts_pb2_grpc.TtsServiceStub(channel).Synthesize(iter(requests))
                    async for response in call:
                        if response.HasField("audio") and "tts" not in client_ttfb:
                            client_ttfb["tts"] = 1000 * (time.perf_counter() - sent)
        turn_id = turn.get_span_context().trace_id.to_bytes(16, "big")
        client_ids = {
            s.name: s.context.span_id.to_bytes(8, "big") for s in bot_spans.get_finished_spans()
        }

        wanted = {
            names.SPAN_ASR_FINALIZE,
            names.SPAN_LLM_REQUEST,
            names.SPAN_TTS_SEGMENT,
            names.SPAN_LLM_CHUNK,
        }
        await double.wait_for(wanted)
        server_spans = {span.name: (service, span) for service, span in double.spans}
        assert wanted <= set(server_spans)

        def attribute(span: object, key: str) -> float:
            return next(a.value.double_value for a in span.attributes if a.key == key)

        finalize_service, finalize = server_spans[names.SPAN_ASR_FINALIZE]
        segment_service, segment = server_spans[names.SPAN_TTS_SEGMENT]
        request_service, request = server_spans[names.SPAN_LLM_REQUEST]
        assert (finalize_service, segment_service, request_service) == (
            "test-asr",
            "test-tts",
            "test-llm",
        )
        for span in (finalize, segment, request):
            assert span.trace_id == turn_id, "one trace id for the whole turn"
        assert finalize.parent_span_id == client_ids["stt"]
        assert segment.parent_span_id == client_ids["tts"]
        # LLM: bot span -> the instrumentation's RPC server span -> llm.request -> llm.chunk.
        rpc = next(span for _, span in double.spans if span.span_id == request.parent_span_id)
        assert rpc.parent_span_id == client_ids["llm"] and "GenerateChunks" in rpc.name
        chunk = server_spans[names.SPAN_LLM_CHUNK][1]
        assert chunk.parent_span_id == request.span_id
        for stage, span in (("asr", finalize), ("llm", request), ("tts", segment)):
            server_ttfb = attribute(span, names.ATTR_TTFB_MS)
            assert 0 <= server_ttfb <= client_ttfb[stage] + 5, (stage, server_ttfb, client_ttfb)

        # The same spans, recorded by the file exporter, make one turn for trace-report.
        for _ in range(50):
            spans = (
                spans_from_otlp_json(recorded.read_text().splitlines()) if recorded.exists() else []
            )
            if wanted <= {s.name for s in spans}:
                break
            await asyncio.sleep(0.1)
        turns = turns_of(spans)
        assert [t.trace_id for t in turns] == [turn_id.hex()]
        figures = summary(turns)
        assert set(figures) == {"asr", "llm", "tts", "end_to_end"}
        assert figures["asr"]["p50"] == pytest.approx(attribute(finalize, names.ATTR_TTFB_MS))
        assert figures["end_to_end"]["p50"] > figures["tts"]["p50"]
    finally:
        await asyncio.gather(*(process.stop() for process in processes.values()))


def test_tracing_off_creates_no_provider_and_records_nothing(monkeypatch):
    monkeypatch.setattr(telemetry_module, "_configured", None)
    telemetry = telemetry_module.configure_telemetry("nemotron-asr", env={})
    assert not telemetry.enabled
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert isinstance(telemetry.tracer, trace.NoOpTracer)
    assert telemetry.histograms == {}
    assert not telemetry_module.tracing_requested(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}
    )
    assert telemetry_module.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})


def _write_recorded_file(path: Path, turns: int) -> None:
    """A small OTLP JSON recording, written by our file exporter from real SDK spans."""
    from services.runtime.otlp_file import OtlpJsonFileExporter

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(path)))
    tracer = provider.get_tracer("recording")
    base = time.time_ns()
    for index in range(turns):
        start = base + index * 5_000_000_000
        with tracer.start_as_current_span(names.SPAN_TURN, start_time=start):
            for name, offset_ms, length_ms, ttfb in (
                (names.SPAN_ASR_FINALIZE, 0, 300, 300.0 + index),
                (names.SPAN_LLM_REQUEST, 310, 900, 180.0),
                (names.SPAN_TTS_SEGMENT, 500, 600, 90.0),
            ):
                span = tracer.start_span(
                    name,
                    start_time=start + offset_ms * 1_000_000,
                    attributes={names.ATTR_TTFB_MS: ttfb},
                )
                span.end(end_time=start + (offset_ms + length_ms) * 1_000_000)


def test_trace_report_reads_a_recorded_file_and_draws_a_timeline(tmp_path):
    recorded = tmp_path / "recorded.jsonl"
    _write_recorded_file(recorded, turns=3)
    png = tmp_path / "timeline.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemotron_speech",
            "trace-report",
            "--file",
            str(recorded),
            "--png",
            str(png),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:6]}
    assert lines["asr"][1:3] == ["3", "301.0"]
    assert lines["llm"][1:3] == ["3", "180.0"]
    assert lines["end_to_end"][1:3] == ["3", "590.0"]  # 500 ms offset + 90 ms first audio
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_prometheus_endpoint_serves_the_ttfb_histograms():
    import urllib.request

    env = {**os.environ, "NEMOTRON_PROMETHEUS_PORT": "0"}
    server = await start_serve_double("asr", env=env)
    try:
        metrics = re.search(r"Prometheus metrics on ([\d.]+:\d+)/metrics", server.head)
        assert metrics is not None, server.head
        await server.wait_serving()
        async with grpc.aio.insecure_channel(server.target) as channel:
            requests = [
                asr_pb2.StreamingRecognizeRequest(
                    config=asr_pb2.RecognitionConfig(sample_rate_hz=16000)
                )
            ]
            requests += [asr_pb2.StreamingRecognizeRequest(audio=f) for f in frames(tone_pcm(0.2))]
            requests.append(
                asr_pb2.StreamingRecognizeRequest(finalize=asr_pb2.Finalize(utterance_id="u"))
            )
            call = asr_pb2_grpc.AsrServiceStub(channel).StreamingRecognize(iter(requests))
            _ = [r async for r in call]

        def scrape() -> str:
            url = f"http://{metrics.group(1)}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                return str(reply.read().decode())

        text = await asyncio.to_thread(scrape)
        assert "nemotron_asr_ttfb" in text
        count = re.search(r"nemotron_asr_ttfb_milliseconds_count\{[^}]*\} (\d+)", text)
        assert count is not None and int(count.group(1)) == 1, text[-2000:]
    finally:
        await server.stop()

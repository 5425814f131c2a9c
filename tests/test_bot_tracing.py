"""The bot's side of a turn's trace: Pipecat's turn span, our client spans, the servers' beneath.

Four processes: three servers (test-double engines) and `nemotron-speech talk`, which runs the real
bot pipeline on a WAV question. All export through the real OTLP exporter to the OTLP receiver
double; the tree must be one trace per turn across the processes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from bots.wav_transport import write_wav
from services.runtime import trace_types as names
from tests.servers import ROOT, ServerProcess, start_serve_double
from tests.speech import speech_pcm


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_bot_turn_is_one_trace_from_pipecat_turn_to_server_spans(receiver, tmp_path):
    double, collector = receiver

    def attribute(span: object, key: str) -> float:
        return next(a.value.double_value for a in span.attributes if a.key == key)

    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    processes: dict[str, ServerProcess] = {}
    try:
        for service in ("asr", "tts", "llm"):
            env = {**os.environ, **otel, "OTEL_SERVICE_NAME": f"test-{service}"}
            processes[service] = await start_serve_double(service, env=env)
        question = tmp_path / "question.wav"
        write_wav(question, bytes(8000) + speech_pcm("What time is it?"), 16000)
        env = {
            **os.environ,
            **otel,
            "OTEL_SERVICE_NAME": "test-bot",
            **{f"NVIDIA_{s.upper()}_URL": process.target for s, process in processes.items()},
        }
        for process in processes.values():
            await process.wait_serving()
        talk = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "nemotron_speech",
                "talk",
                "--in",
                str(question),
                "--out",
                str(tmp_path / "reply.wav"),
                "--timeout",
                "60",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert talk.returncode == 0, talk.stdout + talk.stderr[-3000:]
        assert "reply:" in talk.stdout

        wanted = {
            names.SPAN_TURN,
            names.SPAN_BOT_STT,
            names.SPAN_BOT_LLM,
            names.SPAN_BOT_TTS,
            names.SPAN_ASR_FINALIZE,
            names.SPAN_LLM_REQUEST,
            names.SPAN_TTS_SEGMENT,
        }
        await double.wait_for(wanted)
        by_id = {span.span_id: (service, span) for service, span in double.spans}
        named = {}
        for service, span in double.spans:
            named.setdefault(span.name, (service, span))
        assert wanted <= set(named), sorted(named)

        service, turn = named[names.SPAN_TURN]
        assert service == "test-bot"

        def parent(span: object) -> tuple[str, object]:
            return by_id[span.parent_span_id]

        def child(name: str, of: object) -> tuple[str, object]:
            """The span `name` whose parent (or, across the RPC spans, ancestor) is `of`."""
            for service, span in double.spans:
                if span.name != name:
                    continue
                ancestor = span
                while ancestor.parent_span_id in by_id:
                    if ancestor.parent_span_id == of.span_id:
                        return service, span
                    _, ancestor = parent(ancestor)
            raise AssertionError(f"no {name} under {of.name}")

        # turn -> stt -> asr.finalize (context in the Finalize message)
        stt = named[names.SPAN_BOT_STT][1]
        assert stt.parent_span_id == turn.span_id
        finalize_service, finalize = child(names.SPAN_ASR_FINALIZE, stt)
        assert finalize_service == "test-asr" and finalize.parent_span_id == stt.span_id
        # turn -> llm -> (gRPC client span -> gRPC server span) -> llm.request
        llm = named[names.SPAN_BOT_LLM][1]
        assert llm.parent_span_id == turn.span_id
        request_service, request = child(names.SPAN_LLM_REQUEST, llm)
        assert request_service == "test-llm"
        # turn -> tts -> tts.segment (context in the TextSegment message)
        tts = named[names.SPAN_BOT_TTS][1]
        assert tts.parent_span_id == turn.span_id
        segment_service, segment = child(names.SPAN_TTS_SEGMENT, tts)
        assert segment_service == "test-tts" and segment.parent_span_id == tts.span_id
        for span in (stt, llm, tts, finalize, request, segment):
            assert span.trace_id == turn.trace_id
        # The client spans' TTFB includes the server's and the network: consistent timing.
        for client, server in ((stt, finalize), (tts, segment)):
            client_ttfb = attribute(client, names.ATTR_TTFB_MS)
            assert 0 <= attribute(server, names.ATTR_TTFB_MS) <= client_ttfb + 5
    finally:
        await asyncio.gather(*(process.stop() for process in processes.values()))


def test_bot_tracing_is_off_without_otel_variables(monkeypatch):
    from bots import tracing
    from services.runtime import telemetry

    monkeypatch.setattr(telemetry, "_configured", None)
    monkeypatch.setattr(tracing, "_telemetry", None)
    for variable in list(os.environ):
        if variable.startswith("OTEL_") or variable == "NEMOTRON_TRACE_FILE":
            monkeypatch.delenv(variable)
    assert not tracing.configure_bot_tracing().enabled
    spans = tracing.ClientSpans(object())
    assert spans.start(names.SPAN_BOT_STT) is None
    assert spans.carrier(None) == {}
    monkeypatch.setattr(telemetry, "_configured", None)

"""loadtest.tts_bench end to end against the TTS server with the tone test double (no ASR)."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import tts_bench
from services.runtime.server import MeshServer


async def test_the_benchmark_reports_every_figure(tts_server: MeshServer, tmp_path: Path, capsys):
    output = tmp_path / "tts.json"
    args = tts_bench.build_parser().parse_args(
        [
            "--target",
            f"127.0.0.1:{tts_server.port}",
            "--repeats",
            "1",
            "--cancels",
            "4",
            "--steps",
            "1,2",
            "--capacity-sentences",
            "2",
            "--no-wer",
            "--json",
            str(output),
        ]
    )
    assert await tts_bench.run(args) == 0
    figures = json.loads(output.read_text())
    for mode in ("stream", "batch"):
        assert figures[mode]["segments"] == 40
        assert 0 < figures[mode]["ttfb_ms"]["p50"] <= figures[mode]["ttfb_ms"]["p95"]
        assert figures[mode]["rtf"]["mean"] > 0
    cancel = figures["cancel"]
    assert cancel["trials"] == 4
    assert cancel["audio_chunks_after_cancelled"] == 0
    assert cancel["latency_ms"]["p95"] > 0
    assert [s["streams"] for s in figures["capacity"]["steps"]] == [1, 2]
    assert figures["capacity"]["sustained_streams"] == 2
    assert not figures["capacity"]["limit_found"]
    printed = capsys.readouterr().out
    assert "cancel -> cancelled (ms)" in printed
    assert ">= 2" in printed

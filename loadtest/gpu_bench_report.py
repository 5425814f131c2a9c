"""The GPU benchmark's figures as markdown: the environment, then one table per measurement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _millions(count: int) -> str:
    return f"{count / 1e6:.0f} M" if count >= 10**7 else f"{count / 1e6:.2f} M"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def markdown(figures: dict[str, Any]) -> str:
    """Markdown of the figures written by `loadtest.gpu_bench`."""
    env = figures["environment"]
    device = env["gpu"] or f"CPU ({env['cpu']})"
    lines = [
        f"**{figures['kind']}**"
        + (" (small models: a smoke check, not figures)" * figures["small"]),
        "",
        f"Device: {device}; driver {env.get('driver', 'n/a')}; torch {env['torch']} "
        f"(CUDA {env['cuda']}); nemo_toolkit {env['nemo_toolkit']}; Python {env['python']}.",
        "",
    ]
    asr = figures.get("asr")
    if asr:
        lines += [
            f"ASR: {asr['model']}, {_millions(asr['parameters'])} parameters "
            f"({asr['encoder_layers']} layers, d_model {asr['d_model']}); "
            f"{asr.get('tokens_per_frame', 'n/a')} tokens per 80 ms frame; "
            f"max batch {asr['max_batch']}.",
            "",
        ]
        lines += _table(
            [
                "right context",
                "chunk ms",
                "streams",
                "step p50 ms",
                "step p95 ms",
                "p95 < chunk",
                "passes/step",
                "MiB/stream kept",
                "MiB/stream peak",
            ],
            [
                [
                    p["right_context"],
                    p["chunk_ms"],
                    p["streams"],
                    p["step_ms_p50"],
                    p["step_ms_p95"],
                    p["error"] or p["within_chunk"],
                    p["forwards_per_step"],
                    p["state_mib_per_stream"],
                    p["peak_mib_per_stream"],
                ]
                for p in asr["points"]
            ],
        )
        lines.append("")
        lines += _table(
            ["right context", "chunk ms", "most streams with p95 < chunk", "first over", "probes"],
            [
                [
                    c["right_context"],
                    c["chunk_ms"],
                    c["max_streams"],
                    c["first_failing"] if c["first_failing"] is not None else "none seen",
                    ", ".join(
                        f"{p['streams']}: {p['step_ms_p95']:.1f} ms"
                        + (f" {p['error']}" * bool(p["error"]))
                        for p in c["probes"]
                    )
                    or "-",
                ]
                for c in asr["capacity"]
            ],
        )
        lines.append("")
    tts = figures.get("tts")
    if tts:
        lines += [
            f"TTS: {tts['model']}, {_millions(tts['magpie_parameters'])} parameters plus a "
            f"{_millions(tts['codec_decoder_parameters'])} codec decoder; "
            f"{tts['max_decoder_steps']} frames a job ({tts['sample_rate_hz']} Hz), "
            f"first audio after {tts['chunk_frames']} frames; end token: {tts['end_token']}.",
            "",
        ]
        lines += _table(
            [
                "streams",
                "audio s/job",
                "first audio p50 ms",
                "first audio p95 ms",
                "RTF p50",
                "RTF p95",
                "x real time (all)",
            ],
            [
                [
                    p["concurrency"],
                    p["audio_s_per_job"],
                    p["ttfa_ms_p50"],
                    p["ttfa_ms_p95"],
                    p["rtf_p50"],
                    p["rtf_p95"],
                    p["error"] or p["realtime_streams"],
                ]
                for p in tts["points"]
            ],
        )
        lines.append("")
    if figures.get("interrupted"):
        lines.append("Interrupted: the figures above are those measured before the stop.")
    if figures.get("skipped_for_time"):
        lines.append("Skipped for time: " + "; ".join(figures["skipped_for_time"]) + ".")
    return "\n".join(lines).rstrip() + "\n"

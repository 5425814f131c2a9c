"""`python -m loadtest gpu --small` on the CPU: the GPU benchmark works before device time is spent.

It builds the tiny forms of both random-weight models and drives our real backends (the Parakeet
batched stepper, the Magpie backend) through every measurement; the checks are on the output's
structure and sanity (every requested count present, numbers positive), never on speed. The full
sizes' configs are checked against the published architecture without building them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("nemo.collections.asr")
pytest.importorskip("nemo.collections.tts.models")

from loadtest.__main__ import main as loadtest_main
from loadtest.gpu_bench_models import (
    ASR_CONTEXTS,
    asr_config,
    codec_config,
    magpie_config,
)

pytestmark = [
    pytest.mark.nemo,
    pytest.mark.slow,
    # NeMo and its dependencies warn on import and on model construction (deprecations in
    # lightning and megatron, "CUDA is not available", CPU autocast); none concerns our code.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def test_the_full_configs_are_the_published_architectures(tmp_path: Path):
    asr = asr_config(small=False)
    encoder = asr["encoder"]
    assert (encoder["n_layers"], encoder["d_model"], encoder["n_heads"]) == (24, 1024, 8)
    assert encoder["ff_expansion_factor"] * encoder["d_model"] == 4096
    assert (encoder["subsampling_factor"], encoder["subsampling_conv_channels"]) == (8, 256)
    assert (encoder["conv_kernel_size"], encoder["conv_context_size"]) == (9, "causal")
    assert {1, 6} <= {c[1] for c in ASR_CONTEXTS}
    assert all(c[0] == 70 for c in ASR_CONTEXTS)
    assert asr["decoder"]["prednet"] == {
        "pred_hidden": 640,
        "pred_rnn_layers": 2,
        "t_max": None,
        "dropout": 0.0,
    }
    assert len(asr["labels"]) == 1024 and len(set(asr["labels"])) == 1024
    magpie = magpie_config(small=False, codec_path=tmp_path / "codec.nemo", max_steps=64)
    assert magpie["model_type"] == "decoder_ce" and magpie["embedding_dim"] == 768
    assert [magpie[k]["n_layers"] for k in ("encoder", "context_encoder", "decoder")] == [6, 2, 12]
    assert magpie["decoder"]["d_ffn"] == 3072 and magpie["decoder"]["sa_n_heads"] == 12
    assert magpie["local_transformer_hidden_dim"] == 256
    codec = codec_config(small=False)
    assert codec["samples_per_frame"] == 1024 and codec["sample_rate"] == 22050
    assert codec["vector_quantizer"]["num_groups"] == 8


@pytest.mark.timeout(300)
def test_the_small_run_reports_every_figure(tmp_path: Path, capsys):
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    code = loadtest_main(
        [
            *("gpu", "--small", "--device", "cpu", "--out", str(out), "--md", str(md)),
            *("--streams", "1,2,3", "--tts-concurrency", "1,2"),
        ]
    )
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["kind"] == "random-weight runs of the real architectures"
    assert figures["small"] is True
    env = figures["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None
    assert env["torch"] and env["nemo_toolkit"] and env["python"]
    assert figures["skipped_for_time"] == []

    asr = figures["asr"]
    assert asr["parameters"] > 0 and asr["tokens_per_frame"] > 0
    points = {(p["right_context"], p["streams"]): p for p in asr["points"]}
    assert set(points) == {(rc, n) for rc in (1, 6) for n in (1, 2, 3)}
    for (rc, _), point in points.items():
        assert point["error"] == ""
        assert point["chunk_ms"] == pytest.approx(80 * (rc + 1))
        assert point["steps"] == 3
        assert 0 < point["step_ms_p50"] <= point["step_ms_p95"] <= point["step_ms_max"]
        assert point["forwards_per_step"] >= 1
        # On the CPU there is no GPU memory to report.
        assert point["state_mib_per_stream"] is None and point["peak_mib_per_stream"] is None
    assert [c["right_context"] for c in asr["capacity"]] == [1, 6]
    for found in asr["capacity"]:
        assert found["max_streams"] >= 0
        assert all(p["steps"] == 3 for p in found["probes"] if not p["error"])

    tts = figures["tts"]
    assert tts["magpie_parameters"] > 0 and tts["codec_decoder_parameters"] > 0
    assert "never emitted" in tts["end_token"]
    assert [p["concurrency"] for p in tts["points"]] == [1, 2]
    for point in tts["points"]:
        assert point["error"] == ""
        assert point["frames_per_job"] == tts["max_decoder_steps"]
        # Every job is exactly max_decoder_steps codec frames of audio.
        seconds = tts["max_decoder_steps"] * 1024 / tts["sample_rate_hz"]
        assert point["audio_s_per_job"] == pytest.approx(seconds, rel=0.01)
        assert 0 < point["ttfa_ms_p50"] <= point["ttfa_ms_p95"]
        assert 0 < point["rtf_p50"] <= point["rtf_p95"] and point["realtime_streams"] > 0

    table = md.read_text()
    assert "random-weight runs of the real architectures" in table
    assert "| right context | chunk ms | streams |" in table
    assert "| streams | audio s/job |" in table
    assert table in capsys.readouterr().out


def test_bad_counts_are_refused_with_the_flag_named(tmp_path: Path):
    with pytest.raises(SystemExit, match="--streams"):
        loadtest_main(["gpu", "--small", "--out", str(tmp_path / "x.json"), "--streams", "a,b"])

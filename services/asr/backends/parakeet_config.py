"""NeMo model configs for a cache-aware streaming FastConformer-RNNT, from its sizes.

The layout is Parakeet realtime's (nvidia/nemotron-speech-streaming-en-0.6b): a FastConformer
encoder with causal depthwise-conv caches, 8x dw_striding subsampling, chunked-limited attention
with several right contexts, an RNNT prediction net and joint. What a checkpoint would fix (the
sizes, the labels, the contexts) comes in as arguments, so that a model with random weights can be
built from published numbers where no checkpoint can go: the GPU benchmark's 0.6B
(`loadtest.gpu_bench_models`) and the tests' 2-layer model (`tests/test_asr_parakeet.py`), both
loaded by the `nemo` backend (`services.asr.backends.parakeet`) like a trained one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The log-mel features Parakeet's preprocessor computes (80 bins at 16 kHz, 10 ms hop).
FEATURES = 80


def streaming_rnnt_config(
    *,
    labels: Sequence[str],
    hidden: int,
    layers: int,
    heads: int,
    ff_expansion: int,
    subsampling_channels: int,
    pred_hidden: int,
    pred_layers: int,
    att_contexts: Sequence[Sequence[int]],
    max_symbols: int,
) -> dict[str, Any]:
    """An `EncDecRNNTModel` config (`OmegaConf.create` it) with these sizes; no dropout."""
    return {
        "sample_rate": 16000,
        "labels": list(labels),
        "model_defaults": {
            "enc_hidden": hidden,
            "pred_hidden": pred_hidden,
            "joint_hidden": pred_hidden,
        },
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "normalize": "NA",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": FEATURES,
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 0.0,
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": FEATURES,
            "feat_out": -1,
            "n_layers": layers,
            "d_model": hidden,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": subsampling_channels,
            "causal_downsampling": True,
            "ff_expansion_factor": ff_expansion,
            "self_attention_model": "rel_pos",
            "n_heads": heads,
            "att_context_size": [list(c) for c in att_contexts],
            "att_context_style": "chunked_limited",
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "layer_norm",
            "conv_context_size": "causal",
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "vocab_size": len(labels),
            "prednet": {
                "pred_hidden": pred_hidden,
                "pred_rnn_layers": pred_layers,
                "t_max": None,
                "dropout": 0.0,
            },
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": False,
            "num_classes": len(labels),
            "vocabulary": list(labels),
            "jointnet": {
                "encoder_hidden": hidden,
                "pred_hidden": pred_hidden,
                "joint_hidden": pred_hidden,
                "activation": "relu",
                "dropout": 0.0,
            },
        },
        # Greedy decoding, as the published configs (the backend picks the decoder).
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": max_symbols}},
        "loss": {"loss_name": "default"},
    }

"""The GPU benchmark's models: the seed's speech models built from configuration, random weights.

No checkpoint can reach the GPU machine, but an architecture can: built from the published
configuration, a random-weight model costs the same compute per step as the trained one. Each
builder has a `small` form (a few layers, tens of channels) that runs on a CPU in seconds, so the
benchmark is known to work before device time is spent.

Where the values come from (the sources are cited next to each config):

- Parakeet realtime, nvidia/nemotron-speech-streaming-en-0.6b: a cache-aware FastConformer
  encoder, 24 layers, d_model 1024, 8 heads, feed-forward 4096 (expansion 4), depthwise-conv
  kernel 9 (causal: 8 frames of conv cache), 8x dw_striding subsampling with 256 channels, left
  attention context 70 frames, right contexts 13/6/1/0; an RNNT prediction net of 2 LSTM layers
  of 640 and a joint of 640 over 1024 BPE tokens plus blank.
- Magpie TTS multilingual 357M (nvidia/magpie_tts_multilingual_357m): `decoder_ce`, d_model 768,
  a 6-layer text encoder, a 2-layer context encoder, a 12-layer decoder (12 heads, d_ffn 3072,
  one cross-attention head of 128), a 1-layer local transformer of 256, 8 codebooks of 2016
  codes (+8 special tokens), frame stacking 1, 5 baked speakers of 110 context frames, KV cache
  at inference; its codec, the NeMo nano codec (22.05 kHz, 1024 samples a frame = 21.5 fps,
  8 FSQ codebooks [8, 7, 6, 6], causal HiFi-GAN decoder of 1024 base channels, upsampling
  [8, 8, 4, 2, 2]).

What differs from the checkpoints, and why it does not change the cost per step: the ASR labels
are 1024 single-"character" labels instead of a SentencePiece model (same joint size, and the
tokenizer's detokenization is a string join either way); Magpie's text goes through NeMo's
English character tokenizer instead of the IPA and multilingual tokenizers (their phoneme
dictionaries and pretrained tokenizer are files from a hub): the text embedding table is smaller,
which costs nothing per frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# torch and NeMo come with the nemo extra; without it mypy finds neither (hence the ignores).
import torch  # type: ignore[import-not-found, unused-ignore]
from omegaconf import OmegaConf  # type: ignore[import-not-found, unused-ignore]

from services.asr.backends.parakeet_config import streaming_rnnt_config

#: Right attention contexts of the 0.6B (transformers' NemotronAsrStreamingProcessor
#: DEFAULT_NUM_LOOKAHEAD_TOKENS = [13, 6, 1, 0]; NeMo cache_aware_streaming configs'
#: multi-lookahead example [[70,13],[70,6],[70,1],[70,0]]).
ASR_CONTEXTS = [[70, 13], [70, 6], [70, 1], [70, 0]]
ASR_VOCAB = 1024  # BPE tokens (+ blank = 1025 joint outputs): transformers' vocab_size 1025
#: Tokens per 80 ms encoder frame that the random joint is tuned to emit (about 3.75 tokens/s,
#: conversational speech in 1024-token BPE); random weights would emit one almost every frame.
ASR_TOKENS_PER_FRAME = 0.3


def asr_config(small: bool) -> dict[str, Any]:
    """An EncDecRNNTModel config: the 0.6B's architecture, or a 2-layer one of 32 channels."""
    # Sources: transformers' NemotronAsrStreamingConfig / NemotronAsrStreamingEncoderConfig (doc'd
    # against checkpoint nvidia/nemotron-speech-streaming-en-0.6b: hidden 1024, 24 layers, 8 heads,
    # intermediate 4096, conv kernel 9, subsampling 8 x 256 channels, sliding window 71 = left
    # context 70 + 1, 2 LSTM layers of 640, vocab 1025 with blank 1024); the encoder caches of
    # the exported model, [24, B, 70, 1024] and [24, B, 1024, 8] (parakeet-rs model_nemotron.rs);
    # NeMo examples/asr/conf/fastconformer/cache_aware_streaming/
    # fastconformer_transducer_bpe_streaming.yaml for every other encoder/decoder setting, and its
    # greedy decoding (max_symbols 10). The 80 mel features (`FEATURES`) are transformers' default
    # num_mel_bins for the checkpoint (the multilingual 3.5 sibling uses 128); they size only the
    # subsampling's input projection.
    vocab = 28 if small else ASR_VOCAB
    return streaming_rnnt_config(
        labels=[chr(0x4E00 + i) for i in range(vocab)],  # distinct one-character labels
        hidden=32 if small else 1024,
        layers=2 if small else 24,
        heads=2 if small else 8,
        ff_expansion=4,
        subsampling_channels=16 if small else 256,
        pred_hidden=32 if small else 640,
        pred_layers=1 if small else 2,
        att_contexts=ASR_CONTEXTS,
        max_symbols=10,
    )


def build_asr_model(small: bool, seed: int = 0) -> Any:
    """The random-weight EncDecRNNTModel (on the CPU; the backend moves it to its device)."""
    from nemo.collections.asr.models import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
        EncDecRNNTModel,
    )

    torch.manual_seed(seed)
    return EncDecRNNTModel(cfg=OmegaConf.create(asr_config(small))).eval()


def parameter_count(module: Any) -> int:
    """Parameters of a torch module."""
    return int(sum(p.numel() for p in module.parameters()))


# ---- Magpie TTS and its codec ---------------------------------------------------------------

_CODEC = "nemo.collections.tts.modules.audio_codec_modules."
_TOKENIZERS = "nemo.collections.common.tokenizers.text_to_speech.tts_tokenizers."
CODEC_SAMPLES_PER_FRAME = 1024
CODEC_RATE = 22050


def codec_config(small: bool) -> dict[str, Any]:
    """An AudioCodecModel config: the nano codec's geometry, or a narrow one for the CPU."""
    # Sources: NeMo examples/tts/conf/audio_codec/audio_codec_low_frame_rate_22050.yaml (22.05 kHz,
    # 1024 samples a frame, up [8,8,4,2,2] / down [2,2,4,8,8], 8 FSQ groups of [8,7,6,6] = 2016
    # codes, encoder 48 base channels, decoder 1024, encoded dim 32); the model card of the nano
    # codec (nvidia/nemo-nano-codec-22khz-1.89kbps-21.5fps) and ports of the 357M that name its
    # decoder a causal HiFi-GAN: hence the Causal encoder/decoder classes.
    return {
        "sample_rate": CODEC_RATE,
        "samples_per_frame": CODEC_SAMPLES_PER_FRAME,
        "commit_loss_scale": 0.0,
        "loss_resolutions": [[512, 128, 512]],
        "mel_loss_dims": [64],
        "audio_encoder": {
            "_target_": _CODEC + "CausalHiFiGANEncoder",
            "down_sample_rates": [2, 2, 4, 8, 8],
            "encoded_dim": 32,
            "base_channels": 4 if small else 48,
            "resblock_dilation_sizes": [1],
        },
        "audio_decoder": {
            "_target_": _CODEC + "CausalHiFiGANDecoder",
            "up_sample_rates": [8, 8, 4, 2, 2],
            "input_dim": 32,
            "base_channels": 32 if small else 1024,
            "output_activation": "tanh",
        },
        "vector_quantizer": {
            "_target_": _CODEC + "GroupFiniteScalarQuantizer",
            "num_groups": 8,
            "num_levels_per_group": [8, 7, 6, 6],
        },
        "generator_loss": {
            "_target_": "nemo.collections.tts.losses.audio_codec_loss.GeneratorSquaredLoss"
        },
        "discriminator_loss": {
            "_target_": "nemo.collections.tts.losses.audio_codec_loss.DiscriminatorSquaredLoss"
        },
    }


def magpie_config(small: bool, codec_path: Path, max_steps: int) -> dict[str, Any]:
    """A MagpieTTSModel config: the 357M's architecture, or one layer of 32 channels."""
    # Sources: NeMo examples/tts/conf/magpietts/magpietts_multilingual_v1.yaml (d_model 768,
    # d_ffn 3072, 12 heads, 6 encoder and 12 decoder layers, kernel sizes 3 and 1, one
    # cross-attention head, learnable positions); the architecture as read from the
    # magpie_tts_multilingual_357m checkpoint by a GGML port (MAGPIE_ARCHITECTURE.md: decoder_ce,
    # 2-layer context encoder, cross-attention head dim 128, a 1-layer local transformer of 256,
    # 5 baked speakers x 110 frames, frame stacking 1, KV cache at inference, topk 80,
    # temperature 0.7, cfg scale 2.5) and the Core ML port's card (6L/12L at d=768, LT 1L d=256).
    dim, ffn, heads, layers, xa_head, lt_dim = (
        (32, 64, 1, 1, 32, 32) if small else (768, 3072, 12, None, 128, 256)
    )

    def block(n_layers: int, kernel: int, causal: bool) -> dict[str, Any]:
        return {
            "n_layers": layers or n_layers,
            "d_model": dim,
            "d_ffn": ffn,
            "sa_n_heads": heads,
            "kernel_size": kernel,
            "p_dropout": 0.0,
            "p_dropout_out": 0.0,
            "is_causal": causal,
            "apply_norm_out": True,
            "max_length_causal_mask": 2048,
            "use_learnable_pos_emb": True,
        }

    return {
        "model_type": "decoder_ce",
        "codecmodel_path": str(codec_path),
        "embedding_dim": dim,
        "prior_end_step": 0,
        "prior_scaledown_start_step": 0,
        "use_kv_cache_for_inference": True,
        "frame_stacking_factor": 1,
        "local_transformer_type": "autoregressive",
        "local_transformer_n_layers": 1,
        "local_transformer_n_heads": 1,
        "local_transformer_hidden_dim": lt_dim,
        "text_tokenizers": {
            "english_phoneme": {
                "_target_": _TOKENIZERS + "EnglishCharsTokenizer",
                "punct": True,
                "apostrophe": True,
                "pad_with_space": False,
            }
        },
        "encoder": block(6, 3, True),
        "context_encoder": block(2, 3, False),
        "decoder": {
            **block(12, 1, True),
            "has_xattn": True,
            "xa_d_memory": dim,
            "xa_n_heads": 1,
            "xa_d_head": xa_head,
            "apply_norm_to_cond": True,
        },
        "inference_parameters": {
            "max_decoder_steps": max_steps,
            "topk": 80,
            "temperature": 0.7,
            "cfg_scale": 2.5,
        },
    }


SPEAKERS = 5
CONTEXT_FRAMES = 110


def build_magpie(directory: Path, small: bool, max_steps: int, seed: int = 0) -> Any:
    """A random-weight MagpieTTSModel (on the CPU), its codec saved as a .nemo in `directory`.

    MagpieTTSModel restores its codec from `codecmodel_path` (any path not starting with
    "nvidia/"), so the codec is built from config and saved first. The special tokens (end of
    audio among them) are forbidden in the output projections, so that every text gives exactly
    `max_steps` frames: random weights would end the audio at a random frame, or never.
    """
    from nemo.collections.tts.models import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
        AudioCodecModel,
        MagpieTTSModel,
    )

    torch.manual_seed(seed)
    codec = AudioCodecModel(cfg=OmegaConf.create(codec_config(small)))
    codec_path = directory / "codec.nemo"
    codec.save_to(str(codec_path))
    del codec
    model = MagpieTTSModel(cfg=OmegaConf.create(magpie_config(small, codec_path, max_steps)))
    with torch.no_grad():
        tokens = model.num_all_tokens_per_codebook
        model.final_proj.bias.view(-1, tokens)[:, model.codebook_size :] = -1e4
        for projection in model.local_transformer_out_projections:
            projection.bias[model.codebook_size :] = -1e4
    # Baked speakers, as the 357M has them (its context encoder reads these, not audio).
    dim = int(model.cfg.embedding_dim)
    frames = 3 if small else CONTEXT_FRAMES
    model.baked_context_embedding = torch.nn.Embedding(SPEAKERS, frames * dim)
    model._baked_embedding_T = torch.tensor(frames)
    model._baked_embedding_D = torch.tensor(dim)
    model.baked_context_embedding_len = torch.full((SPEAKERS,), frames, dtype=torch.long)
    return model


def magpie_parameters(model: Any) -> dict[str, int]:
    """Magpie's parameters without its codec, and its codec's decoder's."""
    own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("_codec_model"))
    return {
        "magpie_parameters": int(own),
        "codec_decoder_parameters": parameter_count(model._codec_model.audio_decoder),
    }

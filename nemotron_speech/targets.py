"""Where each service listens, as clients see it."""

from __future__ import annotations

import os

#: Default ports, as in the servers' settings.
DEFAULT_PORTS = {"asr": 8080, "tts": 8001, "llm": 8000}
#: Environment variables that override a client's target (shared with the bots).
TARGET_ENV = {"asr": "NVIDIA_ASR_URL", "tts": "NVIDIA_TTS_URL", "llm": "NVIDIA_LLM_URL"}


def target_of(service: str, host: str = "127.0.0.1") -> str:
    """The gRPC target of `service`: its NVIDIA_*_URL variable, else host:default-port."""
    return os.environ.get(TARGET_ENV[service]) or f"{host}:{DEFAULT_PORTS[service]}"

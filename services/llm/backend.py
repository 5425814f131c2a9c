"""The LLM backend seam: what a language model engine implements to serve GenerateChunks.

A backend turns a chat into a stream of token texts and knows nothing of gRPC or chunking. The
servicer owns validation, sentence chunking, flow control (it simply stops pulling tokens), cancel
(it closes the generator), usage reporting and timings.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from enum import Enum

from services.llm.reasoning import Reasoning
from services.llm.settings import LlmSettings
from services.llm.tools import Tool, ToolCall, ToolChoice, offered
from services.runtime.backend import Backend

ROLES = ("system", "user", "assistant", "tool")


class FinishReason(Enum):
    """Why generation stopped (mirrors the FinishReason of the contract)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class ChatTurn:
    """One message of the conversation.

    An assistant turn may carry the tool calls the model made (its content may then be empty); a
    `tool` turn is the result of the call `tool_call_id` names.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


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
    reasoning: Reasoning = field(default_factory=Reasoning)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)

    @property
    def offered_tools(self) -> tuple[Tool, ...]:
        """The tools the model is shown (none with tool choice NONE)."""
        return offered(self.tools, self.tool_choice)


@dataclass(frozen=True)
class TokenText:
    """The text of `tokens` newly generated tokens.

    Usually one token with its text. A token whose text is not complete yet (part of a UTF-8
    character, text a stop string may still claim) comes with empty text, and its text later with
    `tokens=0`, so that the servicer's counts and timings see every token when it is generated.
    """

    text: str
    tokens: int = 1


@dataclass(frozen=True)
class ReasoningText:
    """Reasoning the model produced before its answer: never chunked, never spoken.

    Counted like `TokenText` (its tokens are completion tokens too).
    """

    text: str
    tokens: int = 1


@dataclass(frozen=True)
class PromptUsage:
    """What the prompt cost, when the backend knows it (before the first text, or at the end).

    `completion_tokens` is the engine's own count where it reports one (an upstream server's
    usage); otherwise the servicer counts the `TokenText` tokens.
    """

    prompt_tokens: int
    cached_prompt_tokens: int = 0
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Finished:
    """Why generation ended; the last event of a generation that was not closed early."""

    reason: FinishReason


GenerationEvent = TokenText | ReasoningText | ToolCall | PromptUsage | Finished


class LlmBackend(Backend[LlmSettings]):
    """A language model engine.

    Implement `model_name` and `generate`. Blocking token steps must run off the event loop, one
    step per await, so that closing the generator stops generation within one token. The backend
    only yields what it produces; the servicer keeps the counts and timings.
    """

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Yield `TokenText` per generated token, `PromptUsage` once known, then `Finished`.

        With `request.offered_tools`, yield a `ToolCall` per call the model makes (ids from
        `tools.new_call_id`), after its answer text if any; the servicer reports the finish
        reason TOOL_CALLS for a generation that made calls.

        Raise `services.runtime.errors.InvalidArgument` for a context that cannot fit the
        model's window even after trimming the oldest turns, and `Unavailable` when an upstream
        server cannot be reached. The servicer closes the generator (aclose) on cancel: stop at
        the next token and free the sequence.
        """

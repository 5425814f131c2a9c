"""Turns a StartGeneration message into a validated request, or INVALID_ARGUMENT with the field."""

from __future__ import annotations

import math
import struct

from nemotron.speech.v1 import llm_pb2
from services.llm.backend import ROLES, ChatTurn, GenerationRequest, Sampling
from services.llm.chunker import ChunkPolicy
from services.llm.reasoning import Reasoning
from services.llm.settings import LlmSettings
from services.llm.tool_validation import parse_tools, tool_choice, turn_tool_calls
from services.runtime.errors import InvalidArgument
from services.runtime.ids import check_client_id

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_CHUNK_TOKENS = 512
MAX_REASONING_BUDGET = 8192


def generation_request(start: llm_pb2.StartGeneration, settings: LlmSettings) -> GenerationRequest:
    """The backend's view of `start`, with defaults filled in."""
    request_id = check_client_id(start.request_id, "start.request_id")
    conversation_id = check_client_id(start.conversation_id, "start.conversation_id")
    tools = parse_tools(start.tools)
    return GenerationRequest(
        request_id=request_id,
        messages=_messages(start, settings),
        sampling=_sampling(start.sampling, settings),
        conversation_id=conversation_id,
        reasoning=_reasoning(start.reasoning),
        tools=tools,
        tool_choice=tool_choice(start.tool_choice, tools),
    )


def _reasoning(config: llm_pb2.ReasoningConfig) -> Reasoning:
    """Off unless asked for; a budget only makes sense with reasoning on."""
    known = (
        llm_pb2.REASONING_MODE_UNSPECIFIED,
        llm_pb2.REASONING_MODE_OFF,
        llm_pb2.REASONING_MODE_ON,
    )
    if config.mode not in known:
        raise InvalidArgument(
            f"reasoning mode {config.mode} is unknown; use REASONING_MODE_OFF or REASONING_MODE_ON",
            field="start.reasoning.mode",
        )
    if config.budget_tokens > MAX_REASONING_BUDGET:
        raise InvalidArgument(
            f"budget_tokens is {config.budget_tokens}; it must be at most {MAX_REASONING_BUDGET}",
            field="start.reasoning.budget_tokens",
        )
    return Reasoning(config.mode == llm_pb2.REASONING_MODE_ON, config.budget_tokens)


def chunk_policy(chunking: llm_pb2.ChunkingPolicy) -> ChunkPolicy:
    """The chunk bounds, defaults 10/24/60 tokens."""
    defaults = ChunkPolicy()
    first_min = _optional(chunking, "first_chunk_min_tokens", defaults.first_min_tokens)
    first_max = _optional(chunking, "first_chunk_max_tokens", defaults.first_max_tokens)
    later_max = _optional(chunking, "later_chunk_max_tokens", defaults.later_max_tokens)
    for name, value in (
        ("first_chunk_min_tokens", first_min),
        ("first_chunk_max_tokens", first_max),
        ("later_chunk_max_tokens", later_max),
    ):
        if not 1 <= value <= MAX_CHUNK_TOKENS:
            raise InvalidArgument(
                f"{name} is {value}; it must be between 1 and {MAX_CHUNK_TOKENS}",
                field=f"start.chunking.{name}",
            )
    if first_max < first_min:
        raise InvalidArgument(
            f"first_chunk_max_tokens ({first_max}) is below first_chunk_min_tokens ({first_min})",
            field="start.chunking.first_chunk_max_tokens",
        )
    return ChunkPolicy(first_min, first_max, later_max)


def _messages(start: llm_pb2.StartGeneration, settings: LlmSettings) -> tuple[ChatTurn, ...]:
    if not start.messages:
        raise InvalidArgument(
            "messages is empty; send at least one user message", field="start.messages"
        )
    total = 0
    turns: list[ChatTurn] = []
    for index, message in enumerate(start.messages):
        field = f"start.messages[{index}]"
        if message.role not in ROLES:
            raise InvalidArgument(
                f"role {message.role!r} is not known; use one of {', '.join(ROLES)}",
                field=f"{field}.role",
            )
        calls = turn_tool_calls(message, field, turns)
        if not message.content.strip() and not calls:
            raise InvalidArgument("content is empty", field=f"{field}.content")
        total += len(message.content) + sum(len(c.arguments) for c in calls)
        turns.append(ChatTurn(message.role, message.content, calls, message.tool_call_id))
    if total > settings.max_prompt_chars:
        raise InvalidArgument(
            f"the conversation is {total} characters; at most {settings.max_prompt_chars} "
            "are accepted",
            field="start.messages",
        )
    if turns[-1].role == "assistant":
        raise InvalidArgument(
            "the last message is the assistant's; end with a user message (or a tool result) "
            "to answer",
            field=f"start.messages[{len(turns) - 1}].role",
        )
    return tuple(turns)


def _sampling(params: llm_pb2.SamplingParams, settings: LlmSettings) -> Sampling:
    defaults = Sampling(
        temperature=settings.default_temperature, max_tokens=settings.default_max_tokens
    )
    sampling = Sampling(
        temperature=_ranged(params, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_ranged(params, "top_p", defaults.top_p, 1e-6, 1.0),
        top_k=int(_ranged(params, "top_k", defaults.top_k, 0, 1000)),
        max_tokens=int(_ranged(params, "max_tokens", defaults.max_tokens, 1, 8192)),
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        repetition_penalty=_ranged(
            params, "repetition_penalty", defaults.repetition_penalty, 0.5, 2.0
        ),
    )
    if len(sampling.stop) > MAX_STOP_STRINGS or any(
        not s or len(s) > MAX_STOP_CHARS for s in sampling.stop
    ):
        raise InvalidArgument(
            f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters",
            field="start.sampling.stop",
        )
    return sampling


def _ranged(
    params: llm_pb2.SamplingParams, name: str, default: float, low: float, high: float
) -> float:
    if not params.HasField(name):
        return default
    sent: float = getattr(params, name)
    value = float(sent)
    if math.isnan(value) or not low <= value <= high:
        raise InvalidArgument(
            f"{name} is {_shown(sent)}; it must be between {low:g} and {high:g}",
            field=f"start.sampling.{name}",
        )
    return value


def _shown(value: float) -> str:
    """`value` as the client wrote it, for an error message.

    An integer field reads as an integer (0, not 0.0); a float field in the fewest digits that give
    back the same 32-bit float (1.1, not 1.100000023841858).
    """
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    for digits in range(1, 9):
        text = f"{value:.{digits}g}"
        if _float32(float(text)) == _float32(value):
            return text
    return f"{value:.9g}"  # nine significant digits name any 32-bit float


def _float32(value: float) -> bytes:
    return struct.pack("<f", value)


def _optional(message: llm_pb2.ChunkingPolicy, name: str, default: int) -> int:
    return int(getattr(message, name)) if message.HasField(name) else default

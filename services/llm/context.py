"""Fitting a conversation into a model's context window, by real token counts.

Backends encode a conversation with the model's own chat template and tokenizer; this module only
decides which turns to keep. The system prompt (the leading system messages) is always kept; the
oldest turns after it are dropped, whole exchanges at a time, so that the kept part starts with a
user turn and ends with the latest one. If even the system prompt and the last user turn do not
fit, the request is refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.llm.backend import ChatTurn
from services.runtime.errors import InvalidArgument


@dataclass(frozen=True)
class FittedPrompt:
    """The turns that fit and their encoding."""

    messages: tuple[ChatTurn, ...]
    tokens: Sequence[int]
    dropped_turns: int


def generation_reserve(window: int, max_tokens: int) -> int:
    """Tokens kept free for the answer: max_tokens, but at most a quarter of the window.

    A request asking for more than that may still get it if the prompt is short; otherwise it
    stops at the window's end with finish reason LENGTH.
    """
    return max(1, min(max_tokens, window // 4))


def fit_to_window(
    messages: Sequence[ChatTurn],
    encode: Callable[[tuple[ChatTurn, ...]], Sequence[int]],
    budget: int,
) -> FittedPrompt:
    """Keep the system prompt and the most recent turns whose encoding fits in `budget` tokens.

    Args:
        messages: The validated conversation (it ends with a user turn).
        encode: The model's prompt for some turns (chat template, then tokenizer).
        budget: The most prompt tokens allowed.

    Returns:
        The kept turns with their encoding; the full conversation when it fits.

    Raises:
        InvalidArgument: Not even the system prompt and the last user turn fit.
    """
    messages = tuple(messages)
    tokens = encode(messages)
    if len(tokens) <= budget:
        return FittedPrompt(messages, tokens, 0)
    head_len = 0
    while head_len < len(messages) and messages[head_len].role == "system":
        head_len += 1
    head, body = messages[:head_len], messages[head_len:]
    # Cut only before a user turn, so that the kept turns read as whole exchanges.
    starts = [i for i, turn in enumerate(body) if turn.role == "user" and i > 0]
    if not starts:
        raise _too_long(len(tokens), budget)
    # Fewer kept turns never encode to more tokens: binary search for the first start that fits.
    low, high = 0, len(starts) - 1
    best: FittedPrompt | None = None
    while low <= high:
        middle = (low + high) // 2
        kept = head + body[starts[middle] :]
        encoded = encode(kept)
        if len(encoded) <= budget:
            best = FittedPrompt(kept, encoded, starts[middle])
            high = middle - 1
        else:
            low = middle + 1
    if best is None:
        shortest = len(encode(head + body[starts[-1] :]))
        raise _too_long(shortest, budget)
    return best


def _too_long(tokens: int, budget: int) -> InvalidArgument:
    return InvalidArgument(
        f"the system prompt and the last user message alone are {tokens} tokens; the model's "
        f"window leaves {budget} for the prompt: shorten them, or lower max_tokens",
        field="start.messages",
    )

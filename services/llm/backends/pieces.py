"""Backend events from text cut into reasoning and answer (`services.llm.reasoning`)."""

from __future__ import annotations

from collections.abc import Callable

from services.llm.backend import GenerationEvent, ReasoningText, TokenText
from services.llm.reasoning import Piece, ThinkSplitter


def _unchanged(text: str) -> str:
    return text


def piece_events(
    pieces: list[Piece], tokens: int, inside: bool, answer: Callable[[str], str] = _unchanged
) -> list[GenerationEvent]:
    """Events for the pieces of `tokens` new tokens; `inside`: reasoning when they began.

    The tokens count with the first piece; tokens without text of their own yet (a tag, part of
    a character) count as reasoning or answer by where they began. `answer` passes answer text
    through a filter first (stop strings).
    """
    events: list[GenerationEvent] = []
    for piece in pieces:
        if piece.reasoning:
            events.append(ReasoningText(piece.text, tokens))
        else:
            events.append(TokenText(answer(piece.text), tokens))
        tokens = 0
    if tokens:
        events.append(ReasoningText("", tokens) if inside else TokenText("", tokens))
    return events


def text_events(splitter: ThinkSplitter, text: str, tokens: int) -> list[GenerationEvent]:
    """Events for `text` of `tokens` new tokens, cut by `splitter`."""
    inside = splitter.inside
    return piece_events(splitter.push(text), tokens, inside)

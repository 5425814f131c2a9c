"""Reasoning kept apart from the answer: `<think>...</think>` cut out of a model's text stream.

Reasoning models (Nemotron-3-Nano, Qwen3, DeepSeek-R1 distills) write their reasoning between
`<think>` and `</think>` before the answer, in the same token stream. A voice agent must never
speak it, so every backend passes its text through `ThinkSplitter`, which says for each piece
whether it is reasoning or answer. Tags may arrive split across tokens ("<th" + "ink>"); a piece
that might be the start of a tag is held back until the next text decides it. A chat template may
open the block itself (its generation prompt ends with `<think>`): then the stream starts inside
the reasoning, and only `</think>` appears in the output.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


@dataclass(frozen=True)
class Reasoning:
    """A request's reasoning setting, validated."""

    enabled: bool = False
    budget_tokens: int = 0  # 0: no budget beyond max_tokens


@dataclass(frozen=True)
class Piece:
    """A run of text that is either reasoning or answer."""

    text: str
    reasoning: bool


class ThinkSplitter:
    """Feed text with `push`; get back the pieces it completed; `flush` at the end."""

    def __init__(self, inside: bool = False) -> None:
        self.inside = inside  # within <think>...</think>
        self.seen_close = False
        self._held = ""
        # The answer usually starts after a blank line that belongs to neither side.
        self._trim_newlines = False

    def push(self, text: str) -> list[Piece]:
        """Add generated text; returns what is decided (reasoning or answer)."""
        buffer = self._held + text
        self._held = ""
        pieces: list[Piece] = []
        while True:
            if self._trim_newlines and not self.inside:
                buffer = buffer.lstrip("\n")
                self._trim_newlines = not buffer
            if not buffer:
                break
            tag = CLOSE_TAG if self.inside else OPEN_TAG
            at = buffer.find(tag)
            if at >= 0:
                self._emit(pieces, buffer[:at])
                buffer = buffer[at + len(tag) :]
                self.seen_close = self.seen_close or self.inside
                self._trim_newlines = self.inside
                self.inside = not self.inside
                continue
            keep = partial_tag_suffix(buffer, tag)
            self._emit(pieces, buffer[: len(buffer) - keep])
            self._held = buffer[len(buffer) - keep :]
            break
        return pieces

    def close_reasoning(self) -> list[Piece]:
        """End the reasoning now (its budget is spent): what was held back, then the answer."""
        pieces: list[Piece] = []
        if self.inside:
            self._emit(pieces, self._held)
            self._held = ""
            self.inside = False
            self.seen_close = True
            self._trim_newlines = True
        return pieces

    def flush(self) -> list[Piece]:
        """The text held back as a possible tag, at the end of generation."""
        pieces: list[Piece] = []
        self._emit(pieces, self._held)
        self._held = ""
        return pieces

    def _emit(self, pieces: list[Piece], text: str) -> None:
        if text:
            pieces.append(Piece(text, self.inside))


def partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def template_takes_enable_thinking(template: str) -> bool:
    """True when a chat template switches reasoning with an `enable_thinking` variable."""
    return "enable_thinking" in template

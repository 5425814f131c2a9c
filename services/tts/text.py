"""Text normalisation and splitting, so that no input can crash or stall a synthesiser."""

from __future__ import annotations

import re
import unicodedata

# Typographic characters that synthesisers mispronounce or reject, mapped to plain ones.
_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2032": "'",
        "\u2033": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2013": ", ",
        "\u2014": ", ",
        "\u2015": ", ",
        "\u2026": "...",
        "\u00a0": " ",
        "\u2009": " ",
        "\u202f": " ",
        "\u200b": "",
    }
)
_WHITESPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")


def normalize(text: str) -> str:
    """Plain, speakable text: typography simplified; controls, emoji and symbols dropped.

    Letters, digits, punctuation and spaces of every script are kept (the voice's phonemizer reads
    numbers in its language); anything of Unicode category C (controls, unassigned, private use)
    or S other than currency and math signs is removed.
    """
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHY)
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category[0] == "C":
            kept.append(" " if char in "\t\n\r\x0b\x0c" else "")
        elif category in ("So", "Sk"):
            kept.append(" ")
        else:
            kept.append(char)
    return _WHITESPACE.sub(" ", "".join(kept)).strip()


def split_for_synthesis(text: str, max_chars: int) -> list[str]:
    """Split normalised text into pieces of at most `max_chars`, at the best boundary.

    Sentence ends first, then clause punctuation, then spaces; a single word longer than
    `max_chars` is cut (it is not a word any voice can say anyway).
    """
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        pieces.extend(_fit(sentence.strip(), max_chars))
    return [piece for piece in pieces if piece]


def _fit(text: str, max_chars: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    for boundary in (_CLAUSE_END, re.compile(r"\s+")):
        parts = boundary.split(text)
        if len(parts) > 1:
            return _pack(parts, max_chars)
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def _pack(parts: list[str], max_chars: int) -> list[str]:
    """Greedily join boundary-separated parts into pieces of at most max_chars."""
    packed: list[str] = []
    current = ""
    for part in parts:
        candidate = f"{current} {part}" if current else part
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            packed.append(current)
        if len(part) <= max_chars:
            current = part
        else:
            packed.extend(_fit(part, max_chars)[:-1])
            current = _fit(part, max_chars)[-1]
    if current:
        packed.append(current)
    return packed

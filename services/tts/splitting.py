"""Splitting speakable text into pieces a synthesiser can say, at the best boundaries.

`split_for_synthesis` bounds the length of what one synthesis call gets; `stream_phrases` cuts
the text of a streamed call so that the first audio comes early. Sentence ends are the shared ones
of `services.runtime.sentences`, as the LLM chunker and the bots see them.
"""

from __future__ import annotations

import re

from services.runtime.sentences import split_sentences

_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")
_SPACE = re.compile(r"\s+")


def split_for_synthesis(text: str, max_chars: int) -> list[str]:
    """Split normalised text into pieces of at most `max_chars`, at the best boundary.

    Sentence ends first, then clause punctuation, then spaces; a single word longer than
    `max_chars` is cut (it is not a word any voice can say anyway). A sentence keeps its closing
    quotes and brackets, and is not cut after an abbreviation or an initial.
    """
    pieces: list[str] = []
    for sentence in split_sentences(text):
        pieces.extend(_fit(sentence, max_chars))
    return [piece for piece in pieces if piece]


# Words before which a clause may be cut when no punctuation comes early enough.
_PHRASE_STARTS = frozenset(
    "and but or so because while when where which who with without for from to in on at about "
    "after before into over under between through during if than then until".split()
)
_MIN_PHRASE_WORDS = 4


def stream_phrases(text: str, first_max_words: int) -> list[str]:
    """Phrases to synthesise one after another so that the first audio comes early.

    The first phrase alone decides the time to first audio: it is the first clause (up to a
    comma, semicolon or colon), cut at a word boundary when longer than `first_max_words` (0: no
    limit), before a conjunction or preposition where one falls after its third word. The rest is
    cut at clause punctuation into phrases of at least four words, which keeps their intonation.
    """
    clauses = [c for c in _CLAUSE_END.split(text.strip()) if c]
    if not clauses:
        return []
    first, rest = clauses[0], clauses[1:]
    words = first.split()
    if 0 < first_max_words < len(words):
        cut = first_max_words
        for index in range(first_max_words, 2, -1):
            if words[index].lower() in _PHRASE_STARTS:
                cut = index
                break
        first = " ".join(words[:cut])
        rest.insert(0, " ".join(words[cut:]))
    phrases = [first]
    pending = ""
    for clause in rest:
        pending = f"{pending} {clause}" if pending else clause
        if len(pending.split()) >= _MIN_PHRASE_WORDS:
            phrases.append(pending)
            pending = ""
    if pending and len(phrases) > 1:
        phrases[-1] = f"{phrases[-1]} {pending}"
    elif pending:
        phrases.append(pending)
    return phrases


def _fit(text: str, max_chars: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    for boundary in (_CLAUSE_END, _SPACE):
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

"""Cuts a stream of tokens into sentence-sized chunks for speaking.

The first chunk should be short (the listener is waiting for it) but not so short that the voice
sounds clipped: it ends at the first sentence end after `first_min_tokens`, or, past
`first_max_tokens`, at the best clause boundary, else at a word boundary. Later chunks end at each
sentence end, or past `later_max_tokens` at a clause or word boundary. A cut is never made inside a
word, a number such as 3.5, or after a common abbreviation (Dr., e.g.). A cut is only made once the
next word has begun, so every chunk carries the whitespace that follows it, and concatenating the
chunks gives back exactly the generated text.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf al inc ltd co corp no nos fig figs approx
    dept est min max govt jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri
    sat sun a.m p.m u.s u.k ph.d""".split()
)
# Sentence punctuation, closing quotes or brackets, whitespace, then the next word's first char.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(\s+)(?=\S)")
_CLAUSE_END = re.compile(r"(?:[,;:]|\s[-\u2013\u2014])[\"'\u201d\u2019)\]]*(\s+)(?=\S)")
_WORD_END = re.compile(r"(\s+)(?=\S)")
_LAST_WORD = re.compile(r"(\S+?)[.!?]+[\"'\u201d\u2019)\]]*$")
_ENDS_SENTENCE = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s*$")


@dataclass(frozen=True)
class ChunkPolicy:
    """Token bounds of chunks."""

    first_min_tokens: int = 10
    first_max_tokens: int = 24
    later_max_tokens: int = 60


@dataclass(frozen=True)
class Chunk:
    """A piece of the answer."""

    index: int
    text: str
    ends_sentence: bool
    token_count: int


class SentenceChunker:
    """Feed tokens with `push`; collect chunks as they complete; `flush` at the end."""

    def __init__(self, policy: ChunkPolicy) -> None:
        self.policy = policy
        self._buffer = ""
        self._token_starts: list[int] = []
        self._next_index = 0

    def push(self, token: str) -> list[Chunk]:
        """Add one token's text; returns the chunks it completed (usually none or one)."""
        if not token:
            return []
        # A token is anchored at its first visible character: " Done." belongs to the chunk that
        # starts with "Done.", not to the one that ends with the space before it.
        leading = len(token) - len(token.lstrip()) if token.strip() else 0
        self._token_starts.append(len(self._buffer) + leading)
        self._buffer += token
        chunks = []
        while (chunk := self._try_cut()) is not None:
            chunks.append(chunk)
        return chunks

    def flush(self) -> list[Chunk]:
        """The rest of the text as a last chunk (none if it is only whitespace)."""
        if not self._buffer.strip():
            return []
        text = self._buffer
        return [self._emit(len(text), bool(_ENDS_SENTENCE.search(text)))]

    def _try_cut(self) -> Chunk | None:
        first = self._next_index == 0
        min_tokens = self.policy.first_min_tokens if first else 1
        max_tokens = self.policy.first_max_tokens if first else self.policy.later_max_tokens
        for match in _SENTENCE_END.finditer(self._buffer):
            cut = match.end(1)
            if self._tokens_before(cut) >= min_tokens and not self._is_abbreviation(match.start()):
                return self._emit(cut, ends_sentence=True)
        if len(self._token_starts) <= max_tokens:
            return None
        for pattern in (_CLAUSE_END, _WORD_END):
            cut = self._last_cut(pattern, min_tokens)
            if cut:
                return self._emit(cut, ends_sentence=False)
        return None  # one very long word so far: wait for its end

    def _last_cut(self, pattern: re.Pattern[str], min_tokens: int) -> int:
        """The latest boundary of `pattern` that still leaves at least `min_tokens` before it."""
        # A cut must leave some visible text before it, or the chunk would be only whitespace.
        cuts = [
            m.end(1) for m in pattern.finditer(self._buffer) if self._buffer[: m.end(1)].strip()
        ]
        good = [cut for cut in cuts if self._tokens_before(cut) >= min_tokens]
        return (good or cuts or [0])[-1]

    def _is_abbreviation(self, punctuation_at: int) -> bool:
        head = self._buffer[: punctuation_at + 1]
        match = _LAST_WORD.search(head)
        if match is None:
            return False
        word = match.group(1).lstrip("\"'(\u201c\u2018[").lower()
        if word in ABBREVIATIONS:
            return True
        # A single letter before the period is an initial ("J. R. R. Tolkien"), not a sentence.
        return len(word) == 1 and word.isalpha() and self._buffer[punctuation_at] == "."

    def _tokens_before(self, position: int) -> int:
        return bisect.bisect_left(self._token_starts, position)

    def _emit(self, cut: int, ends_sentence: bool) -> Chunk:
        tokens = self._tokens_before(cut)
        chunk = Chunk(self._next_index, self._buffer[:cut], ends_sentence, tokens)
        self._next_index += 1
        self._buffer = self._buffer[cut:]
        # A token that straddles the cut is counted in the chunk its anchor falls in.
        self._token_starts = [start - cut for start in self._token_starts[tokens:]]
        return chunk

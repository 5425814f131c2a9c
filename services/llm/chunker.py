"""Cuts a stream of tokens into sentence-sized chunks for speaking.

The first chunk should be short (the listener is waiting for it) but not so short that the voice
sounds clipped: it ends at the first sentence end after `first_min_tokens`, or, once past
`first_max_tokens`, at the best (latest) clause boundary after the min, else at a word boundary.
Later chunks end at each sentence end; one that has grown to half of `later_max_tokens` also ends at
the next clause boundary, and one that has reached it at the next word boundary. A cut is never
made inside a word, a number such as 3.5, or after a common abbreviation (Dr., e.g.): sentence ends
are those of `services.runtime.sentences`, shared with the TTS splitter and the bots. A cut is only
made once the next word has begun, so every chunk carries the whitespace that follows it, and
concatenating the chunks gives back exactly the generated text.

Text held back after a cut was generated before the chunk could be sent. After a later chunk it is
at most the one token that began the next word: each of its cuts is decided as its boundary
arrives, which keeps a chunk from waiting on text past a good boundary and, with flow control
(`wait_for_continue`), keeps generation from running ahead of the chunks released. Only the first
chunk looks back (to prefer a sentence end up to its max), holding back at most
`first_max_tokens - first_min_tokens` tokens before anything has been sent.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from services.runtime.sentences import CLOSERS, ends_sentence, sentence_breaks

# Clause punctuation or a dash, closing quotes or brackets, whitespace, then the next word.
_CLAUSE_END = re.compile(rf"(?:[,;:]|\s[-\u2013\u2014])[{re.escape(CLOSERS)}]*(\s+)(?=\S)")
_WORD_END = re.compile(r"(\s+)(?=\S)")


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

    def push(self, text: str, tokens: int = 1) -> list[Chunk]:
        """Add the text of `tokens` generated tokens; returns the chunks it completed.

        `tokens` is usually 1. It is more when earlier tokens had no text of their own (part of a
        UTF-8 character, text held back while it might begin a stop string) and 0 for text that
        only completes tokens already counted, so that chunk token counts add up to the tokens
        generated. Empty text is ignored (its tokens are counted with the next text).
        """
        if not text:
            return []
        # A token is anchored at its first visible character: " Done." belongs to the chunk that
        # starts with "Done.", not to the one that ends with the space before it.
        leading = len(text) - len(text.lstrip()) if text.strip() else 0
        self._token_starts += [len(self._buffer) + leading] * tokens
        self._buffer += text
        chunks = []
        while (chunk := self._try_cut()) is not None:
            chunks.append(chunk)
        return chunks

    def flush(self) -> list[Chunk]:
        """The rest of the text as a last chunk (none if it is only whitespace)."""
        if not self._buffer.strip():
            return []
        text = self._buffer
        return [self._emit(len(text), ends_sentence(text))]

    def _try_cut(self) -> Chunk | None:
        if self._next_index == 0:
            return self._try_first_cut()
        cut = next(sentence_breaks(self._buffer), None)
        if cut is not None:
            return self._emit(cut, ends_sentence=True)
        later_max = self.policy.later_max_tokens
        for pattern, from_tokens in ((_CLAUSE_END, (later_max + 1) // 2), (_WORD_END, later_max)):
            cuts = self._cuts(pattern, from_tokens)
            if cuts:
                return self._emit(cuts[0], ends_sentence=False)
        return None  # no boundary yet, or one very long word so far: wait for its end

    def _try_first_cut(self) -> Chunk | None:
        min_tokens = self.policy.first_min_tokens
        for cut in sentence_breaks(self._buffer):
            if self._tokens_before(cut) >= min_tokens:
                return self._emit(cut, ends_sentence=True)
        if len(self._token_starts) <= self.policy.first_max_tokens:
            return None
        for pattern in (_CLAUSE_END, _WORD_END):
            cuts = self._cuts(pattern, min_tokens)
            if cuts:
                return self._emit(cuts[-1], ends_sentence=False)
        return None  # one very long word since the min: wait for its end

    def _cuts(self, pattern: re.Pattern[str], min_tokens: int) -> list[int]:
        """The boundaries of `pattern` with at least `min_tokens` before them."""
        # A cut must leave some visible text before it, or the chunk would be only whitespace.
        return [
            cut
            for cut in (match.end(1) for match in pattern.finditer(self._buffer))
            if self._tokens_before(cut) >= min_tokens and self._buffer[:cut].strip()
        ]

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

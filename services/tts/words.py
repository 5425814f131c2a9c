"""Word timings of a segment: from the words a backend spoke back to the words the client wrote.

The servicer normalises a segment's text before synthesis ("It costs $42." is spoken as "It costs
forty two dollars."), splits it into pieces, and a backend reports when each word of a piece starts
in the audio it yields (`WordTime`). `SegmentWords` maps those spoken words back to the words of the
text as sent (whitespace-separated, punctuation included, offsets in code points) and hands the
session each original word once, in order, with its times from the start of the segment's audio:

- a written word spoken as several words ("$42." -> "forty two dollars.") starts with the first of
  them and ends with the last one known when it is handed out;
- a written word that is not spoken at all (an emoji, a lone dash) gets no length: it sits at the
  end of the word before it (at the start of the word after it when it comes first).

The alignment of written to spoken words matches words by their letters and digits (difflib); in a
run that differs (numbers, symbols, abbreviations written out), each written word takes the spoken
words that spell it ("pm" -> "p m") or as many as it is written out to on its own ("3:30" -> "three
thirty"), whichever shares the run out best.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from services.tts.speakable import normalize

_WORD = re.compile(r"\S+")
#: Runs larger than this (written x spoken words) are shared out in proportion, not searched.
_MAX_SEARCH = 4096
#: Written words that difflib compares at once (it costs the square of what it compares).
_ALIGN_WINDOW = 16


class TimingSource(Enum):
    """How a backend found its word times."""

    MODEL = "model"
    ESTIMATED = "estimated"


@dataclass(frozen=True)
class WordTime:
    """When one word of a synthesis job is spoken, in the audio it is yielded with.

    Attributes:
        index: The word's position in `job.text.split()`.
        start_ms: Start of the word, in ms from the start of the audio it comes with.
        end_ms: End of the word, same origin (may lie past that audio's end).
    """

    index: int
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class TextWord:
    """A whitespace-separated word of a text and its offset in code points."""

    text: str
    offset: int


@dataclass
class PlacedWord:
    """A word of the segment's text as sent, with its times in the segment's audio."""

    word: str
    text_offset: int
    start_ms: float
    end_ms: float
    source: TimingSource


def split_words(text: str) -> list[TextWord]:
    """The whitespace-separated words of `text`, with their offsets (Python indexes code points)."""
    return [TextWord(match.group(0), match.start()) for match in _WORD.finditer(text)]


def word_key(word: str) -> str:
    """What two spellings of a word share: its letters and digits, case-folded."""
    return "".join(c for c in unicodedata.normalize("NFKC", word).casefold() if c.isalnum())


def align_words(written: Sequence[str], spoken: Sequence[str], language: str = "en") -> list[range]:
    """For each written word, the range of spoken words that say it (possibly empty).

    The ranges are in order and do not overlap; every spoken word belongs to one written word
    (a spoken word with no written counterpart joins the written word before it). Words that
    match pair up directly; where they differ, difflib compares a window of each text (its cost
    grows with the square of what it compares) and settles the run up to the next match.
    """
    written_keys = [word_key(w) for w in written]
    spoken_keys = [word_key(w) for w in spoken]
    starts = [0] * len(written)
    ends = [0] * len(written)
    # Spoken words per written word in a window: twice the text's own ratio, so that a window
    # of spoken words reaches past what its written words say.
    ratio = 2 * max(1.0, len(spoken) / max(1, len(written)))
    i = j = 0
    window = _ALIGN_WINDOW
    while i < len(written):
        if j < len(spoken) and written_keys[i] and written_keys[i] == spoken_keys[j]:
            starts[i], ends[i] = j, j + 1  # the common case, without difflib
            i, j = i + 1, j + 1
            continue
        spoken_window = math.ceil(window * ratio)
        final = i + window >= len(written) and j + spoken_window >= len(spoken)
        ops = difflib.SequenceMatcher(
            None, written_keys[i : i + window], spoken_keys[j : j + spoken_window], autojunk=False
        ).get_opcodes()
        if not final:
            # Settle the differing run up to the first match after it, if that lies early
            # enough in both windows for what follows it not to matter; else look further.
            settled = next(
                (
                    k
                    for k, (tag, _, i2, _, j2) in enumerate(ops)
                    if tag == "equal" and i2 <= window // 2 and j2 <= spoken_window // 2
                ),
                None,
            )
            if settled is None:
                window *= 2
                continue
            ops = ops[: settled + 1]
        for tag, i1, i2, j1, j2 in ops:
            span = (i + i1, i + i2, j + j1, j + j2)
            _apply(tag, span, written, spoken_keys, language, starts, ends)
        i, j = i + ops[-1][2], j + ops[-1][4]
        window = _ALIGN_WINDOW
    ranges = [range(s, e) for s, e in zip(starts, ends, strict=True)]
    # Spoken words inserted before the first written word belong to the first one that speaks.
    first = next((i for i, r in enumerate(ranges) if r), None)
    if first is not None and ranges[first].start > 0:
        ranges[first] = range(0, ranges[first].stop)
    return ranges


def _apply(
    tag: str,
    span: tuple[int, int, int, int],
    written: Sequence[str],
    spoken_keys: Sequence[str],
    language: str,
    starts: list[int],
    ends: list[int],
) -> None:
    """Record one difflib opcode (`span`: its indexes, absolute) in `starts` and `ends`."""
    i1, i2, j1, j2 = span
    if tag == "equal":
        for k in range(i2 - i1):
            starts[i1 + k], ends[i1 + k] = j1 + k, j1 + k + 1
    elif tag == "insert":
        if i1 > 0:
            ends[i1 - 1] = j2  # extra spoken words belong to the written word before
    else:
        for k, (start, end) in enumerate(_share(written[i1:i2], spoken_keys[j1:j2], language)):
            starts[i1 + k], ends[i1 + k] = j1 + start, j1 + end


def _share(written: Sequence[str], spoken: Sequence[str], language: str) -> list[tuple[int, int]]:
    """Share the spoken words (keys) of a differing run out among its written words, in order.

    Search (dynamic programming) for the split that costs least: nothing for a written word whose
    key is its spoken words' keys joined, else the difference between how many spoken words it
    takes and how many it is written out to alone, plus a half.
    """
    count, total = len(written), len(spoken)
    if count == 0:
        return []
    if count * total * total > _MAX_SEARCH:
        return [(k * total // count, (k + 1) * total // count) for k in range(count)]
    keys = [word_key(word) for word in written]
    alone = [sum(1 for w in normalize(word, language).split() if word_key(w)) for word in written]
    best: list[list[float]] = [[float("inf")] * (total + 1) for _ in range(count + 1)]
    back: list[list[int]] = [[0] * (total + 1) for _ in range(count + 1)]
    best[0][0] = 0.0
    for k in range(count):
        for j in range(total + 1):
            if best[k][j] == float("inf"):
                continue
            for end in range(j, total + 1):
                exact = keys[k] != "" and keys[k] == "".join(spoken[j:end])
                cost = 0.0 if exact else abs(end - j - alone[k]) + 0.5
                if best[k][j] + cost < best[k + 1][end]:
                    best[k + 1][end] = best[k][j] + cost
                    back[k + 1][end] = j
    shares: list[tuple[int, int]] = []
    end = total
    for k in range(count, 0, -1):
        start = back[k][end]
        shares.append((start, end))
        end = start
    return shares[::-1]


def spoken_word_indexes(pieces: Sequence[str], spoken: Sequence[str]) -> list[list[int]]:
    """For each piece, the spoken word (index into `spoken`) of each of its words.

    The pieces are cut from the spoken text at spaces, except that a word too long for one piece
    is cut inside; its parts all map to that word.
    """
    result: list[list[int]] = []
    index, rest = 0, spoken[0] if spoken else ""
    for piece in pieces:
        mapped: list[int] = []
        for part in piece.split():
            while index < len(spoken) and not rest:
                index += 1
                rest = spoken[index] if index < len(spoken) else ""
            mapped.append(min(index, len(spoken) - 1))
            rest = rest[len(part) :] if rest.startswith(part) else ""
        result.append(mapped)
    return result


class SegmentWords:
    """Turns the word times of a segment's synthesis jobs into its written words, once each.

    Args:
        text: The segment's text as sent.
        spoken: The normalised text that is spoken.
        pieces: The pieces of `spoken` given to the backend, one synthesis job each.
        language: The language `spoken` was normalised for.
    """

    def __init__(self, text: str, spoken: str, pieces: Sequence[str], language: str = "en") -> None:
        self.written = split_words(text)
        spoken_words = spoken.split()
        self._piece_words = spoken_word_indexes(pieces, spoken_words)
        ranges = align_words([w.text for w in self.written], spoken_words, language)
        # Whose time places each written word: (spoken index, at that word's end?).
        self._owner: list[tuple[int, bool]] = []
        self._written_of: dict[int, int] = {}  # spoken index -> the written word it says
        previous: int | None = None
        for written, span in enumerate(ranges):
            for spoken_index in span:
                self._written_of[spoken_index] = written
            if span:
                self._owner.append((span.start, False))
                previous = span.stop - 1
            elif previous is not None:
                self._owner.append((previous, True))
            else:
                following = next((r.start for r in ranges[written:] if r), 0)
                self._owner.append((following, False))
        self._next = 0  # first written word not yet placed
        self._pending: list[PlacedWord] = []
        self._open: dict[int, PlacedWord] = {}  # written index -> its entry, while pending

    @property
    def pending(self) -> int:
        """Words placed in time but not yet handed out."""
        return len(self._pending)

    def on_audio(
        self, piece: int, times: Sequence[WordTime], offset_ms: float, source: TimingSource
    ) -> None:
        """Record the times a job reported for audio starting at `offset_ms` of the segment."""
        mapping = self._piece_words[piece] if piece < len(self._piece_words) else []
        for time in times:
            if not 0 <= time.index < len(mapping):
                continue
            spoken = mapping[time.index]
            start = offset_ms + time.start_ms
            end = offset_ms + max(time.end_ms, time.start_ms)
            while self._next < len(self.written) and self._owner[self._next][0] <= spoken:
                owner, at_end = self._owner[self._next]
                # A word whose own spoken word was never timed starts with the next one timed.
                at = end if at_end and owner == spoken else start
                word = self.written[self._next]
                placed = PlacedWord(word.text, word.offset, at, at, source)
                self._pending.append(placed)
                self._open[self._next] = placed
                self._next += 1
            says = self._written_of.get(spoken)
            if says is not None and says in self._open:
                self._open[says].end_ms = max(self._open[says].end_ms, end)

    def take(self, until_ms: float) -> list[PlacedWord]:
        """The pending words that start before `until_ms`, in order; they leave the pending list."""
        count = 0
        while count < len(self._pending) and self._pending[count].start_ms < until_ms:
            count += 1
        return self._take(count)

    def take_rest(self) -> list[PlacedWord]:
        """Every pending word (for the segment's last chunk)."""
        return self._take(len(self._pending))

    def _take(self, count: int) -> list[PlacedWord]:
        taken, self._pending = self._pending[:count], self._pending[count:]
        if taken:
            first = self._next - len(self._pending) - len(taken)
            for index in range(first, first + len(taken)):
                self._open.pop(index, None)
        return taken


def estimate_word_times(words: Sequence[str], audio_ms: float, first: int = 0) -> list[WordTime]:
    """Word times for `audio_ms` of speech of `words`, shared out by their letters and digits.

    For backends that know no durations: each word gets a share of the audio in proportion to
    its length (at least one character), so long words last longer; pauses are not modelled.
    """
    weights = [max(1, len(word_key(word))) for word in words]
    total = sum(weights) or 1
    times: list[WordTime] = []
    elapsed = 0
    for index, weight in enumerate(weights):
        start = audio_ms * elapsed / total
        elapsed += weight
        times.append(WordTime(first + index, start, audio_ms * elapsed / total))
    return times


#: A speaking pace for estimates made before the audio's length is known: ms per letter or
#: digit, ms per word (onsets and gaps), and the silence before the first word.
PACE_MS_PER_LETTER = 70.0
PACE_MS_PER_WORD = 60.0
PACE_LEAD_MS = 100.0


class PacedWords:
    """Word times estimated from a speaking pace, for audio that arrives before its length is known.

    Each word is predicted to start after the letters of the words before it at `PACE_*`; a
    chunk of audio takes the words predicted to start in it (never earlier than the chunk), and
    the last chunk takes every word left, so each word is handed out once.
    """

    def __init__(self, words: Sequence[str], first: int = 0) -> None:
        self._starts: list[float] = []
        self._lengths: list[float] = []
        at = PACE_LEAD_MS
        for word in words:
            length = PACE_MS_PER_LETTER * max(1, len(word_key(word)))
            self._starts.append(at)
            self._lengths.append(length)
            at += length + PACE_MS_PER_WORD
        self._first = first
        self._next = 0
        self._elapsed = 0.0

    def take(self, audio_ms: float, last: bool = False) -> tuple[WordTime, ...]:
        """The words that start in the next `audio_ms` of audio (all that are left if `last`)."""
        end = self._elapsed + audio_ms
        times: list[WordTime] = []
        while self._next < len(self._starts) and (last or self._starts[self._next] < end):
            start = min(max(self._starts[self._next], self._elapsed), end) - self._elapsed
            if last and audio_ms > 0:
                start = min(start, audio_ms - 1e-3)
            times.append(
                WordTime(self._first + self._next, start, start + self._lengths[self._next])
            )
            self._next += 1
        self._elapsed = end
        return tuple(times)

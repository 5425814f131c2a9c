"""Word times of a Piper phrase from the durations VITS gave its phonemes.

Piper speaks a phrase sentence by sentence; for each it reports the phonemes (espeak-ng's IPA,
words separated by spaces) and, when the model is patched to output them, how many samples each
phoneme lasted (with "^" and "$" for the silences that open and close the sentence). A spoken word
starts at its first phoneme and ends with its last one; punctuation and spaces are pauses.

espeak-ng sometimes runs words together ("of the" -> "ʌvðə"), so the phrase's written words and its
phoneme words need not be as many. Both are first cut into clauses at punctuation (espeak keeps
",", "." and the like as phonemes); clause by clause, words pair up one to one where the counts
agree, and otherwise each written word is placed by its share of the clause's letters along the
clause's phonemes, which keeps every word inside its clause's speech and in order.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from services.tts.words import TimingSource, WordTime, estimate_word_times, word_key

_SENTENCE_MARKS = ("^", "$")
#: Punctuation that espeak-ng keeps as a pause phoneme, and so closes a clause on both sides.
_CLAUSE_MARKS = frozenset(",.;:!?")


@dataclass(frozen=True)
class SentencePhonemes:
    """What piper reports of one sentence it spoke.

    Attributes:
        phonemes: The sentence's phonemes, words separated by " ".
        samples: Length of the sentence's audio.
        durations: (phoneme, samples) from the model, "^" first and "$" last; None when the
            model gives none.
    """

    phonemes: list[str]
    samples: int
    durations: list[tuple[str, int]] | None


@dataclass
class _PhonemeWord:
    start: int
    end: int
    phones: list[tuple[int, int]]  # (start, end) of each sound, stress and length marks aside
    clause_end: bool = False  # punctuation or the sentence's end follows


def phrase_word_times(
    words: Sequence[str], sentences: Sequence[SentencePhonemes], rate: int, first: int = 0
) -> tuple[list[WordTime], TimingSource]:
    """Times of `words` (the phrase's written words) in the phrase's audio.

    Args:
        words: The phrase's words, in order.
        sentences: Piper's sentences of the phrase, in order.
        rate: The audio's sample rate.
        first: Index of the phrase's first word among the job's words.

    Returns:
        One time per word, indexed from `first`, and MODEL when every sentence had its
        durations from the model (ESTIMATED otherwise).
    """
    source = TimingSource.MODEL
    spoken: list[_PhonemeWord] = []
    offset = 0
    for sentence in sentences:
        durations = sentence.durations
        if durations is None:
            source = TimingSource.ESTIMATED
            durations = _even_durations(sentence)
        spoken.extend(_phoneme_words(durations, offset))
        offset += sentence.samples
    to_ms = 1000.0 / rate
    if not words:
        return [], source
    if not spoken:
        return estimate_word_times(words, offset * to_ms, first), TimingSource.ESTIMATED
    written_clauses = _clauses([_ends_clause(word) for word in words])
    spoken_clauses = _clauses([word.clause_end for word in spoken])
    if len(written_clauses) != len(spoken_clauses):
        written_clauses, spoken_clauses = [range(len(words))], [range(len(spoken))]
    times: list[WordTime] = []
    for written, said in zip(written_clauses, spoken_clauses, strict=True):
        clause = [spoken[i] for i in said]
        if len(clause) == len(written):
            times.extend(
                WordTime(first + i, w.start * to_ms, w.end * to_ms)
                for i, w in zip(written, clause, strict=True)
            )
        else:
            phones = [phone for word in clause for phone in word.phones]
            clause_words = [words[i] for i in written]
            times.extend(_by_letters(clause_words, phones, to_ms, first + written.start))
    return times, source


def _ends_clause(word: str) -> bool:
    return word[-1] in _CLAUSE_MARKS if word else False


def _clauses(ends: Sequence[bool]) -> list[range]:
    """Consecutive index ranges, each closed by a True (the last one by the end)."""
    ranges: list[range] = []
    start = 0
    for index, end in enumerate(ends):
        if end or index == len(ends) - 1:
            ranges.append(range(start, index + 1))
            start = index + 1
    return ranges


def _even_durations(sentence: SentencePhonemes) -> list[tuple[str, int]]:
    """The sentence's audio shared evenly among its phonemes and its two silences."""
    marks = ["^", *sentence.phonemes, "$"]
    share = sentence.samples / len(marks)
    edges = [round(i * share) for i in range(len(marks) + 1)]
    return [(mark, edges[i + 1] - edges[i]) for i, mark in enumerate(marks)]


def _phoneme_words(durations: Sequence[tuple[str, int]], offset: int) -> list[_PhonemeWord]:
    words: list[_PhonemeWord] = []
    current: _PhonemeWord | None = None
    at = offset
    for phoneme, samples in durations:
        kind = _kind(phoneme)
        if kind == "pause":
            if words and (phoneme in _CLAUSE_MARKS or phoneme == "$"):
                words[-1].clause_end = True
            current = None
        else:
            if current is None:
                current = _PhonemeWord(at, at + samples, [])
                words.append(current)
            current.end = at + samples
            if kind == "sound":
                current.phones.append((at, at + samples))
        at += samples
    return [word for word in words if word.phones]


def _kind(phoneme: str) -> str:
    """A phone ("sound"), a stress or length mark ("mark"), or a space or punctuation."""
    if phoneme in _SENTENCE_MARKS or not phoneme.strip():
        return "pause"
    categories = {unicodedata.category(c) for c in phoneme}
    if any(c[0] == "L" and c != "Lm" for c in categories):
        return "sound"
    if categories <= {"Lm", "Mn", "Sk"}:
        return "mark"
    return "pause"


def _by_letters(
    words: Sequence[str], phones: Sequence[tuple[int, int]], to_ms: float, first: int
) -> list[WordTime]:
    """Place each word at its share of the phrase's letters along the phrase's phones."""
    weights = [len(word_key(word)) for word in words]
    total = sum(weights) or 1
    count = len(phones)
    times: list[WordTime] = []
    elapsed = 0
    for index, weight in enumerate(weights):
        first_phone = min(count - 1, math.floor(elapsed * count / total))
        elapsed += weight
        last_phone = max(first_phone, min(count - 1, math.ceil(elapsed * count / total) - 1))
        start = phones[first_phone][0]
        end = phones[last_phone][1] if weight else start
        times.append(WordTime(first + index, start * to_ms, end * to_ms))
    return times

"""Word timings of TTS segments: written words to spoken words, and Piper's phonemes to words."""

from __future__ import annotations

import pytest

from services.tts.backends.piper_timing import SentencePhonemes, phrase_word_times
from services.tts.speakable import normalize
from services.tts.splitting import split_for_synthesis
from services.tts.words import (
    PacedWords,
    SegmentWords,
    TimingSource,
    WordTime,
    align_words,
    estimate_word_times,
    spoken_word_indexes,
)


def spoken_by_word(written: str) -> list[tuple[str, str]]:
    words, spoken = written.split(), normalize(written).split()
    ranges = align_words(words, spoken)
    pairs = zip(words, ranges, strict=True)
    return [(word, " ".join(spoken[i] for i in span)) for word, span in pairs]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("It costs $42.", [("It", "It"), ("costs", "costs"), ("$42.", "forty two dollars.")]),
        (
            "at 3:30 pm \U0001f44d, ok?",
            [
                ("at", "at"),
                ("3:30", "three thirty"),
                ("pm", "p m,"),
                ("\U0001f44d,", ""),
                ("ok?", "ok?"),
            ],
        ),
        ("Dr. Smith & co", [("Dr.", "Doctor"), ("Smith", "Smith"), ("&", "and"), ("co", "co")]),
        ("Hi \u2014 there", [("Hi", "Hi,"), ("\u2014", ""), ("there", "there")]),
        ("the 1990s", [("the", "the"), ("1990s", "nineteen nineties")]),
    ],
)
def test_written_words_map_to_the_spoken_words_that_say_them(written, expected):
    assert spoken_by_word(written) == expected


def test_every_spoken_word_belongs_to_one_written_word_in_order():
    written = "\U0001f600 Call 555-1234 or 1-800 now, it's 50% off \u2026 \u00a33.50 each"
    words, spoken = written.split(), normalize(written).split()
    ranges = align_words(words, spoken)
    assert [i for span in ranges for i in span] == list(range(len(spoken)))


def test_a_word_cut_between_pieces_maps_both_parts_to_it():
    spoken = ["a", "b" * 30, "c"]
    pieces = ["a " + "b" * 10, "b" * 20 + " c"]
    assert spoken_word_indexes(pieces, spoken) == [[0, 1], [1, 2]]


def test_segment_words_are_handed_out_once_in_order_at_their_starts():
    text = "Well \U0001f642 it costs $42. Bye"
    spoken = normalize(text)
    pieces = split_for_synthesis(spoken, 400)
    words = SegmentWords(text, spoken, pieces)
    # Pieces "Well it costs forty two dollars." and "Bye"; the first comes in two yields.
    assert pieces == ["Well it costs forty two dollars.", "Bye"]
    first = [WordTime(0, 10, 200), WordTime(1, 250, 300), WordTime(2, 320, 500)]
    words.on_audio(0, first, 0.0, TimingSource.MODEL)
    assert [w.word for w in words.take(260)] == ["Well", "\U0001f642", "it"]
    later = [
        WordTime(3, 0, 100),
        WordTime(4, 100, 200),
        WordTime(5, 200, 400),
    ]
    words.on_audio(0, later, 600.0, TimingSource.MODEL)
    words.on_audio(1, [WordTime(0, 100, 200)], 1000.0, TimingSource.MODEL)
    rest = words.take(2000)
    assert [(w.word, w.text_offset, w.start_ms, w.end_ms) for w in rest] == [
        ("costs", 10, 320, 500),
        ("$42.", 16, 600, 1000),
        ("Bye", 21, 1100, 1200),
    ]
    assert words.pending == 0 and words.take_rest() == []


def test_estimated_times_share_the_audio_by_length():
    times = estimate_word_times(["a", "bbb", "cccc"], 800.0, first=2)
    assert [(t.index, t.start_ms, t.end_ms) for t in times] == [
        (2, 0, 100),
        (3, 100, 400),
        (4, 400, 800),
    ]


def sentence(durations: list[tuple[str, int]]) -> SentencePhonemes:
    phonemes = [p for p, _ in durations[1:-1]]
    return SentencePhonemes(phonemes, sum(n for _, n in durations), durations)


def test_piper_phonemes_pair_with_words_and_skip_pauses():
    said = sentence(
        [("^", 100), ("h", 50), ("\u02c8", 10), ("a", 90), (" ", 20), ("j", 100), ("o", 100),
         (",", 300), (" ", 20), ("b", 100), ("i", 100), ("$", 100)]
    )  # fmt: skip
    times, source = phrase_word_times(["hi", "you,", "bee"], [said], 1000, first=4)
    assert source is TimingSource.MODEL
    assert [(t.index, t.start_ms, t.end_ms) for t in times] == [
        (4, 100, 250),
        (5, 270, 470),
        (6, 790, 990),
    ]


def test_piper_words_run_together_are_placed_inside_their_clause():
    # espeak says "of the" as one word; the clause after the comma still starts after the pause.
    said = sentence(
        [("^", 100), ("ʌ", 100), ("v", 100), ("ð", 100), ("ə", 100), (",", 400), (" ", 0),
         ("s", 100), ("i", 100), ("$", 100)]
    )  # fmt: skip
    times, _ = phrase_word_times(["of", "the,", "see"], [said], 1000)
    assert [t.start_ms for t in times] == [100, 200, 900]  # "the" at 2 of 5 letters
    assert times[1].end_ms == 500


def test_piper_without_durations_estimates_from_phonemes():
    said = SentencePhonemes(list("ab cd"), 700, None)
    times, source = phrase_word_times(["ab", "cd"], [said], 1000)
    assert source is TimingSource.ESTIMATED
    assert [(t.start_ms, t.end_ms) for t in times] == [(100, 300), (400, 600)]


def test_paced_words_are_handed_out_once_and_the_last_chunk_takes_the_rest():
    paced = PacedWords(["one", "two", "three", "four"], first=3)
    first = paced.take(300.0)
    second = paced.take(100.0)
    last = paced.take(50.0, last=True)
    taken = [*first, *second, *last]
    assert [t.index for t in taken] == [3, 4, 5, 6]
    assert [t.index for t in first] == [3]  # "one" at 100 ms; "two" is predicted at 370 ms
    assert [t.index for t in second] == [4]
    assert all(0 <= t.start_ms < 50.0 for t in last)
    assert paced.take(100.0, last=True) == ()

"""Text normalisation and splitting: every input becomes plain, speakable text."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tts.speakable import normalize
from services.tts.splitting import split_for_synthesis, stream_phrases

ENGLISH = [
    # numbers
    ("I have 3 cats.", "I have three cats."),
    (
        "1,234,567 people",
        "one million, two hundred and thirty four thousand, five hundred and sixty seven people",
    ),
    ("pi is 3.14", "pi is three point one four"),
    ("It is -7 outside", "It is minus seven outside"),
    ("0.5 liters", "zero point five liters"),
    (
        "Call 12345678901234567890",
        "Call one two three four five six seven eight nine zero one "
        "two three four five six seven eight nine zero",
    ),
    ("version 2.0.1", "version two dot zero dot one"),
    ("mp3 files", "mp three files"),
    ("mix 3/4 cup", "mix three quarters cup"),
    # ordinals
    ("the 21st century", "the twenty first century"),
    ("March 3rd and 2nd place", "March third and second place"),
    ("the 100th time", "the one hundredth time"),
    # percentages
    ("Growth was 12.5% today", "Growth was twelve point five percent today"),
    ("down -2 %", "down minus two percent"),
    # years and decades
    ("In 1999 and 2024.", "In nineteen ninety nine and twenty twenty four."),
    ("since 2000", "since two thousand"),
    ("the 1980s", "the nineteen eighties"),
    # currency
    ("$12.50", "twelve dollars and fifty cents"),
    ("$1", "one dollar"),
    ("$0.99", "ninety nine cents"),
    ("€3 each", "three euros each"),
    ("£1,000", "one thousand pounds"),
    ("£1.01", "one pound and one penny"),
    ("$1.5 million", "one point five million dollars"),
    ("$10k", "ten thousand dollars"),
    ("5€ or 7 £", "five euros or seven pounds"),
    # times and units
    ("at 3:05 pm", "at three oh five p m"),
    ("at 10:00", "at ten o'clock"),
    ("9am", "nine a m"),
    ("20°C", "twenty degrees Celsius"),
    ("5 km in 10k steps", "five kilometers in ten thousand steps"),
    # abbreviations
    ("Dr. Smith is here.", "Doctor Smith is here."),
    ("I saw the Dr. today", "I saw the Doctor today"),
    ("Mr. and Mrs. Brown", "Mister and Missus Brown"),
    ("St. Paul lives on Baker St. in town", "Saint Paul lives on Baker Street in town"),
    ("apples, pears, etc.", "apples, pears, et cetera."),
    ("cats vs. dogs", "cats versus dogs"),
    ("Smith Jr. said e.g. this", "Smith Junior said for example this"),
    ("No. 5 and #7", "number five and number seven"),
    ("Tom & Jerry", "Tom and Jerry"),
    # typography, emoji, controls
    ("\u201cHi,\u201d she said \u2014 \u2018ok\u2019\u2026", "\"Hi,\" she said, 'ok'..."),
    ("Great \U0001f44d\U0001f3fd job \u2764\ufe0f", "Great job"),
    ("a\x00b\x07c\x1b d\u202e\ufeff", "abc d"),
    ("one\r\ntwo\tthree", "one two three"),
    ("\u2460 and \u00bd", "one and one half"),
    ("[[h\u0259l\u02c8o]]", "((h\u0259l\u02c8o))"),
    # empty
    ("", ""),
    ("   \n\t\u3000 ", ""),
    ("\U0001f600\u200b", ""),
]


@pytest.mark.parametrize(("raw", "spoken"), ENGLISH, ids=[raw[:24] for raw, _ in ENGLISH])
def test_english_normalisation(raw, spoken):
    assert normalize(raw) == spoken
    assert normalize(raw, "en-US") == spoken


@pytest.mark.parametrize(
    ("language", "raw", "spoken"),
    [
        ("de", "Es kostet 42 Euro.", "Es kostet zweiundvierzig Euro."),
        ("fr-FR", "J'ai 21 ans.", "J'ai vingt et un ans."),
        ("es", "Tengo 3 gatos.", "Tengo tres gatos."),
        ("zh", "\u6211\u6709 3 \u53ea\u732b", "\u6211\u6709 3 \u53ea\u732b"),
        ("de", "Dr. M\u00fcller \U0001f600", "Dr. M\u00fcller"),
    ],
)
def test_other_languages_get_their_own_numbers_and_no_english_rules(language, raw, spoken):
    assert normalize(raw, language) == spoken


def plain(text: str) -> bool:
    return (
        text == text.strip()
        and "  " not in text
        and all(unicodedata.category(c)[0] != "C" for c in text)
        and all(unicodedata.category(c) not in ("So", "Sk") or c == "\u00b0" for c in text)
        and "[[" not in text
    )


@settings(max_examples=400, deadline=None)
@given(st.text(), st.sampled_from(["en", "en-US", "de", "fr", "zh", "vi", "xx"]))
def test_any_unicode_becomes_plain_text_without_raising(raw, language):
    spoken = normalize(raw, language)
    assert plain(spoken)
    assert plain(normalize(spoken, language))


NUMBERISH = st.text(alphabet="0123456789.,%$\u20ac\u00a3-:/ #kmstndrh", max_size=40)


@settings(max_examples=400, deadline=None)
@given(NUMBERISH)
def test_numbers_and_symbols_in_any_arrangement_never_raise(raw):
    spoken = normalize(raw)
    assert plain(spoken)
    assert not any(c.isdigit() for c in spoken)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=3000), st.integers(min_value=20, max_value=400))
def test_split_pieces_fit_and_keep_every_word(raw, max_chars):
    spoken = normalize(raw)
    pieces = split_for_synthesis(spoken, max_chars)
    assert all(0 < len(piece) <= max_chars for piece in pieces)
    assert "".join(pieces).replace(" ", "") == spoken.replace(" ", "")


def test_long_text_is_split_at_sentences_then_clauses():
    sentence = "This sentence, which is long, has a clause or two in it. "
    pieces = split_for_synthesis(normalize(sentence * 10), 40)
    assert all(len(p) <= 40 for p in pieces)
    assert pieces[:3] == [
        "This sentence, which is long,",
        "has a clause or two in it.",
        "This sentence, which is long,",
    ]


@pytest.mark.parametrize(
    ("text", "limit", "phrases"),
    [
        ("Hi.", 6, ["Hi."]),
        ("", 6, []),
        ("Sure, I can help with that today.", 6, ["Sure,", "I can help with that today."]),
        (
            "The weather in Paris is mild today, around eighteen degrees.",
            6,
            ["The weather in Paris is mild", "today, around eighteen degrees."],
        ),
        (
            "I think we should probably go to the store and buy some milk",
            6,
            ["I think we should probably go", "to the store and buy some milk"],
        ),
        (
            "Please book a table for two at seven tonight.",
            6,
            ["Please book a table for two", "at seven tonight."],
        ),
        ("One two three four five six seven eight", 0, ["One two three four five six seven eight"]),
        ("a, b, c, d, e f g h, i.", 6, ["a,", "b, c, d, e f g h, i."]),
    ],
)
def test_stream_phrases(text, limit, phrases):
    assert stream_phrases(text, limit) == phrases


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=500), st.integers(min_value=0, max_value=12))
def test_stream_phrases_keep_every_word_in_order(raw, limit):
    spoken = normalize(raw)
    phrases = stream_phrases(spoken, limit)
    assert " ".join(phrases).split() == spoken.split()
    if phrases and limit:
        assert len(phrases[0].split()) <= limit

"""The one definition of where sentences end, and the three places that use it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bots import tts
from services.llm.chunker import ChunkPolicy, SentenceChunker
from services.runtime.sentences import (
    ends_sentence,
    follows_abbreviation,
    sentence_breaks,
    split_sentences,
)
from services.tts.splitting import split_for_synthesis

# Closing quotes and brackets, straight and curly, that stay with the sentence they close.
CLOSED = ["Done.'", "Done.]", "Done.\u201d", "Done.\u2019", 'Done."', "Really?)", 'Stop!")']


@pytest.mark.parametrize(
    "text", ["Done.", "Done!", "Done?", "Wait...", "Done.  ", "Done.\n", *CLOSED]
)
def test_a_sentence_mark_then_closing_quotes_brackets_and_spaces_ends_a_sentence(text):
    assert ends_sentence(text)


@pytest.mark.parametrize("text", ["", "Done", "Done,", "Done:", "Done.x", "(Done.) and", "3.5"])
def test_anything_else_ends_no_sentence(text):
    assert not ends_sentence(text)


def test_a_text_that_stops_at_an_abbreviation_has_still_ended():
    assert ends_sentence("We sell paper, pens, etc.")


@pytest.mark.parametrize(
    "text", ["Ask Dr.", "Use e.g.", "(Mr.", "\u201cDr.", "U.S.", "Meet Gen.", "Read J."]
)
def test_a_period_after_an_abbreviation_or_an_initial_follows_it(text):
    assert follows_abbreviation(text)


@pytest.mark.parametrize("text", ["", "Done.", "Is it J?", "Plan A!", "Really?"])
def test_other_sentence_marks_follow_no_abbreviation(text):
    assert not follows_abbreviation(text)


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Hi. How are you?", ["Hi.", "How are you?"]),
        ("She said \u201cstop.\u201d Then left.", ["She said \u201cstop.\u201d", "Then left."]),
        ("It's 'done.' Next.", ["It's 'done.'", "Next."]),
        ("See [this.] Then go.", ["See [this.]", "Then go."]),
        ("It rose (sharply?) Then fell.", ["It rose (sharply?)", "Then fell."]),
        ("Wait... What?! Yes.", ["Wait...", "What?!", "Yes."]),
        ("The value is 3.5 today. Ok.", ["The value is 3.5 today.", "Ok."]),
        ("Ask Dr. Smith now. Ok.", ["Ask Dr. Smith now.", "Ok."]),
        ("Use e.g. salt. Ok.", ["Use e.g. salt.", "Ok."]),
        ("Read J. R. R. Tolkien. Ok.", ["Read J. R. R. Tolkien.", "Ok."]),
        ("  Trailing space.  ", ["Trailing space."]),
        ("", []),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_a_break_comes_after_the_closing_marks_and_the_whitespace():
    text = 'He said "go."  Then left.'
    assert list(sentence_breaks(text)) == [text.index("Then")]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab .!?,'\"\u201d)]\n", max_size=40))
def test_every_break_follows_a_sentence_end_and_precedes_a_word(text):
    for cut in sentence_breaks(text):
        assert ends_sentence(text[:cut])
        assert text[cut - 1].isspace() and not text[cut].isspace()


@pytest.mark.parametrize("text", CLOSED)
def test_the_tts_adapter_ends_a_sentence_where_the_shared_rules_do(text):
    # A TextFrame's segment ends a sentence (and is followed by a pause) by this very rule.
    assert tts.ends_sentence is ends_sentence
    assert tts.ends_sentence(text)


@pytest.mark.parametrize("closed", CLOSED)
def test_the_chunker_and_the_tts_splitter_keep_closing_marks_with_their_sentence(closed):
    text = f"{closed} Next one."
    chunker = SentenceChunker(ChunkPolicy(first_min_tokens=1))
    chunks = [c for token in text.split(" ") for c in chunker.push(f"{token} ")]
    assert chunks[0].text == f"{closed} "
    assert chunks[0].ends_sentence
    assert split_for_synthesis(text, 100) == [closed, "Next one."]

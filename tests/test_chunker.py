"""The sentence chunker on its own: cases and properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.llm.chunker import Chunk, ChunkPolicy, SentenceChunker


def chunk(
    text: str, policy: ChunkPolicy | None = None, tokens: list[str] | None = None
) -> list[Chunk]:
    chunker = SentenceChunker(policy or ChunkPolicy())
    out: list[Chunk] = []
    for token in tokens if tokens is not None else re.findall(r"\s*\S+|\s+$", text):
        out += chunker.push(token)
    return out + chunker.flush()


def texts(chunks: list[Chunk]) -> list[str]:
    return [c.text for c in chunks]


SHORT = ChunkPolicy(first_min_tokens=1, first_max_tokens=24, later_max_tokens=60)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hi. How are you?", ["Hi. ", "How are you?"]),
        ('She said "stop." Then left.', ['She said "stop." ', "Then left."]),
        ("It rose (sharply!) Then fell.", ["It rose (sharply!) ", "Then fell."]),
        ("Wait... What?", ["Wait... ", "What?"]),
        ("The value is 3.5 today. Ok.", ["The value is 3.5 today. ", "Ok."]),
        ("Ask Dr. Smith now. Ok.", ["Ask Dr. Smith now. ", "Ok."]),
        ("Use e.g. salt. Ok.", ["Use e.g. salt. ", "Ok."]),
        ("Read J. R. R. Tolkien. Ok.", ["Read J. R. R. Tolkien. ", "Ok."]),
        ("Really?! Yes.", ["Really?! ", "Yes."]),
        ("No punctuation at the end", ["No punctuation at the end"]),
    ],
)
def test_sentence_boundaries(text, expected):
    assert texts(chunk(text, SHORT)) == expected


def test_first_chunk_waits_for_min_tokens():
    text = "Yes. I can do that for you right now, it is no problem at all. Bye."
    result = chunk(text)
    assert result[0].text == "Yes. I can do that for you right now, it is no problem at all. "
    assert result[0].token_count >= 10


def test_first_chunk_past_max_cuts_at_a_clause_then_a_word():
    clause = (
        "one two three four five six seven eight nine ten eleven twelve, "
        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty "
        "twentyone twentytwo twentythree twentyfour twentyfive"
    )
    result = chunk(clause)
    assert result[0].text.endswith("twelve, ")
    assert not result[0].ends_sentence
    words = " ".join(f"w{i}" for i in range(40))
    result = chunk(words)
    assert result[0].token_count <= 25
    assert result[0].text.endswith(" ")  # cut between words, never inside one


def test_later_chunks_honour_their_max():
    policy = ChunkPolicy(first_min_tokens=1, first_max_tokens=5, later_max_tokens=8)
    result = chunk("Go. " + " ".join(f"w{i}" for i in range(30)) + ".", policy)
    assert all(c.token_count <= 9 for c in result[1:])


def test_first_chunk_never_ends_before_its_min_at_an_early_clause():
    # A clause boundary before the min is no place for the first cut, even once past the max.
    words = "As she settles down on the old matou units, " + " ".join(f"w{i}" for i in range(30))
    result = chunk(words)
    assert result[0].token_count >= 10
    assert result[0].token_count <= 25


def test_a_later_clause_past_half_the_max_ends_the_chunk_when_it_arrives():
    policy = ChunkPolicy(first_min_tokens=1, first_max_tokens=4, later_max_tokens=10)
    text = "Go. one two, three four five six, seven eight nine ten eleven twelve."
    assert texts(chunk(text, policy)) == [
        "Go. ",
        "one two, three four five six, ",
        "seven eight nine ten eleven twelve.",
    ]


def test_tokens_without_text_of_their_own_are_counted_with_the_next_text():
    chunker = SentenceChunker(SHORT)
    out = chunker.push("Caf", 1) + chunker.push("\u00e9.", 2)  # 3 tokens: "Caf", 2 UTF-8 bytes
    out += chunker.push(" Ok", 1) + chunker.push(".", 0)  # text completing a counted token
    out += chunker.flush()
    assert texts(out) == ["Caf\u00e9. ", "Ok."]
    assert [c.token_count for c in out] == [3, 1]


def test_numbers_are_never_split():
    tokens = ["The", " price", " is", " 3", ".", "5", " dollars", ".", " Ok", "."]
    result = chunk("", SHORT, tokens)
    assert texts(result) == ["The price is 3.5 dollars. ", "Ok."]


def test_token_counts_add_up():
    tokens = ["Hello", " there", ".", " How", " are", " you", "?"]
    result = chunk("", SHORT, tokens)
    assert [c.token_count for c in result] == [3, 4]


def test_whitespace_only_output_gives_no_chunk():
    assert chunk("", tokens=["  ", "\n"]) == []


token_text = st.one_of(
    st.text(alphabet=list("abc XYZ.,!?;:'\"()-\n3"), min_size=1, max_size=6),
    st.sampled_from(["Dr.", " e.g.", " 3.5", "...", " Mr.", "\u201d", " \u2014"]),
)


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(token_text, max_size=120),
    first_min=st.integers(1, 12),
    first_extra=st.integers(0, 20),
    later_max=st.integers(1, 40),
)
def test_properties_concatenation_and_no_empty_chunk(tokens, first_min, first_extra, later_max):
    policy = ChunkPolicy(first_min, first_min + first_extra, later_max)
    result = chunk("", policy, tokens)
    full = "".join(tokens)
    assert all(c.text.strip() for c in result)
    assert [c.index for c in result] == list(range(len(result)))
    if len(result) > 1:
        assert result[0].token_count >= first_min
    if full.strip():
        assert "".join(texts(result)) == full
        assert sum(c.token_count for c in result) == len([t for t in tokens if t])
    else:  # an answer of only whitespace has nothing to speak
        assert result == []


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(token_text, max_size=120),
    first_min=st.integers(1, 12),
    first_extra=st.integers(0, 20),
    later_max=st.integers(1, 40),
)
def test_property_a_later_cut_holds_back_at_most_the_token_that_began_the_next_word(
    tokens, first_min, first_extra, later_max
):
    # What flow control relies on: once a later chunk is out, nothing of the next one was
    # generated beyond the token that showed where the cut goes. The first chunk may look back,
    # but never further than from past its max to its min.
    chunker = SentenceChunker(ChunkPolicy(first_min, first_min + first_extra, later_max))
    pushed = emitted = 0
    for token in tokens:
        chunks = chunker.push(token)
        pushed += 1
        emitted += sum(c.token_count for c in chunks)
        if chunks and chunks[-1].index > 0:
            assert pushed - emitted <= 1
        elif chunks:
            assert pushed - emitted <= first_extra + 1

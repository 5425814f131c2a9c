"""Where sentences end: the one definition the LLM chunker, the TTS splitter and the bots share.

A sentence ends at a run of sentence marks (`.`, `!`, `?`), followed by any closing quotes and
brackets, which stay with the sentence they close (`He said "stop."`, `(really?)`). A period
after a common abbreviation ("Dr.", "e.g.") or a single-letter initial ("J. R. R. Tolkien") ends
no sentence inside a text; a text that stops there has still ended, so `ends_sentence` does not
ask about abbreviations.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

SENTENCE_MARKS = ".!?"
#: Closing quotes and brackets, straight and curly, that stay with the sentence they close.
CLOSERS = "\"'\u201d\u2019)]"
#: Opening quotes and brackets, which may come before the first word of a sentence.
OPENERS = "\"'\u201c\u2018(["

#: Words, lower case and without their final period, whose period ends no sentence.
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt sen rep gen capt lt sgt rev gov pres
    ave rd blvd inc ltd co corp dept univ govt
    vs etc e.g i.e cf al no nos fig figs approx est min max hr hrs a.m p.m u.s u.k ph.d
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun""".split()
)

_MARKS = f"[{re.escape(SENTENCE_MARKS)}]"
_CLOSING = f"[{re.escape(CLOSERS)}]*"
#: Sentence marks, closing quotes or brackets, then whitespace (group 1) before the next word.
SENTENCE_END = re.compile(rf"{_MARKS}+{_CLOSING}(\s+)(?=\S)")
_ENDS_SENTENCE = re.compile(rf"{_MARKS}{_CLOSING}\s*$")
_LAST_WORD = re.compile(rf"(\S+?){_MARKS}+{_CLOSING}$")


def ends_sentence(text: str) -> bool:
    """Whether `text` ends with a sentence mark, then perhaps closing quotes, brackets, spaces."""
    return _ENDS_SENTENCE.search(text) is not None


def follows_abbreviation(text: str) -> bool:
    """Whether the sentence mark that ends `text` belongs to an abbreviation or an initial.

    Such a mark ends no sentence: "Ask Dr." or "Read J." is not a place to cut "Ask Dr. Smith"
    or "Read J. R. R. Tolkien".
    """
    match = _LAST_WORD.search(text)
    if match is None:
        return False
    word = match.group(1).lstrip(OPENERS).lower()
    if word in ABBREVIATIONS:
        return True
    return len(word) == 1 and word.isalpha() and text.endswith(".")


def sentence_breaks(text: str) -> Iterator[int]:
    """Where each sentence after the first begins in `text`: the end of the whitespace before it.

    A sentence's closing quotes and brackets and the whitespace after it come before its break;
    a sentence end that follows an abbreviation or an initial is no break.
    """
    for match in SENTENCE_END.finditer(text):
        if not follows_abbreviation(text[: match.start() + 1]):
            yield match.end(1)


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped of surrounding whitespace, none empty."""
    sentences = []
    start = 0
    for cut in sentence_breaks(text):
        sentences.append(text[start:cut].strip())
        start = cut
    sentences.append(text[start:].strip())
    return [sentence for sentence in sentences if sentence]

"""Text normalisation, so that no input can crash or stall a synthesiser.

`normalize` turns any string into plain, speakable text: typography simplified, controls, emoji
and pictographs dropped, and (for English) numbers, currency, percentages, ordinals, years, times
and common abbreviations written out as words, so that every voice reads them alike. Numbers in
other languages are written out with num2words where it knows the language; otherwise the digits
are left to the voice's own front end.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from num2words import num2words  # type: ignore[import-untyped]

# Typographic characters that synthesisers mispronounce or reject, mapped to plain ones. Square
# and curly brackets become parentheses: piper reads "[[...]]" as raw phonemes.
_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2032": "'",
        "\u2033": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2013": ", ",
        "\u2014": ", ",
        "\u2015": ", ",
        "\u2026": "...",
        "\u00a0": " ",
        "\u2009": " ",
        "\u202f": " ",
        "\u200b": "",
        "\u2044": "/",
        "[": "(",
        "]": ")",
        "{": "(",
        "}": ")",
    }
)
_WHITESPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+(?=[,.;:!?])")
_REPEATED_CLAUSE_MARK = re.compile(r"([,;:])(?:\s*[,;:])+")


# Emoji presentation selectors (category Mn) that would be left over from removed emoji.
def _is_variation_selector(char: str) -> bool:
    return "\ufe00" <= char <= "\ufe0f" or "\U000e0100" <= char <= "\U000e01ef"


# Symbols of category So that the English normaliser reads out.
_KEPT_SYMBOLS = frozenset("°")

#: Numbers longer than this are read digit by digit (phone numbers, ids, and num2words' limit).
_MAX_CARDINAL_DIGITS = 15


def normalize(text: str, language: str = "en") -> str:
    """Plain, speakable text for a voice speaking `language` (a BCP-47 tag).

    Letters, digits, punctuation and spaces of every script are kept; anything of Unicode
    category C (controls, unassigned, private use) is removed, and symbols other than currency
    and math signs (emoji, pictographs, modifiers) become spaces. Then numbers and symbols are
    written out: fully for English, numbers only for the other languages num2words knows.
    """
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHY)
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category[0] == "C" or _is_variation_selector(char):
            kept.append(" " if char in "\t\n\r\x0b\x0c" else "")
        elif category in ("So", "Sk") and char not in _KEPT_SYMBOLS:
            kept.append(" ")
        else:
            kept.append(char)
    text = _WHITESPACE.sub(" ", "".join(kept)).strip()
    primary = language.replace("_", "-").split("-")[0].lower()
    if primary == "en":
        text = _english(text)
    elif primary in _NUM2WORDS_LANGUAGES:
        text = _NUMBER.sub(lambda m: f" {_cardinal(m.group(0).replace(',', ''), primary)} ", text)
    text = _REPEATED_CLAUSE_MARK.sub(r"\1", _SPACE_BEFORE_PUNCTUATION.sub("", text))
    return _WHITESPACE.sub(" ", text).strip().lstrip(",;:").strip()


# ---- English ----------------------------------------------------------------------------------

# "Dr." and "St." are titles before a capitalised word ("Dr. Smith", "St. Paul"), "Drive" and
# "Street" after one ("Baker St."), and otherwise "Doctor" and "Street". Other titles are expanded
# wherever they stand. An abbreviation's period that also ended a sentence is kept.
_NAME_TITLES = {"Dr": "Doctor", "St": "Saint"}
_TITLES = {
    "Mr": "Mister",
    "Mrs": "Missus",
    "Ms": "Miz",
    "Prof": "Professor",
    "Mt": "Mount",
    "Sen": "Senator",
    "Rep": "Representative",
    "Gen": "General",
    "Capt": "Captain",
    "Lt": "Lieutenant",
    "Sgt": "Sergeant",
    "Rev": "Reverend",
    "Gov": "Governor",
    "Pres": "President",
}
_STREETS = {"Dr": "Drive", "St": "Street"}
_ABBREVIATIONS = {
    "Dr": "Doctor",
    "St": "Street",
    "Ave": "Avenue",
    "Rd": "Road",
    "Blvd": "Boulevard",
    "Jr": "Junior",
    "Sr": "Senior",
    "Inc": "Incorporated",
    "Ltd": "Limited",
    "Corp": "Corporation",
    "Co": "Company",
    "Dept": "Department",
    "Univ": "University",
    "approx": "approximately",
    "etc": "et cetera",
    "vs": "versus",
    "no": "number",
    "No": "number",
    "fig": "figure",
    "Fig": "figure",
    "min": "minutes",
    "hr": "hours",
    "hrs": "hours",
    "e.g": "for example",
    "i.e": "that is",
    "a.m": "a m",
    "p.m": "p m",
}
_NAME_TITLE = re.compile(r"\b(Dr|St)\.(?=\s+[A-Z])")
_STREET = re.compile(r"\b([A-Z][a-z]+) (Dr|St)\.(\s+[A-Z]|\s*$)?")
_TITLE = re.compile(r"\b(" + "|".join(_TITLES) + r")\.(?=\s)")
_ABBREVIATION = re.compile(
    r"(?<![\w.])(" + "|".join(re.escape(a) for a in _ABBREVIATIONS) + r")\.(\s+[A-Z]|\s*$)?"
)
_NUMBER_SIGN = re.compile(r"\b(?:No|no)\.\s*(?=\d)|#(?=\d)")
_AMPM = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*([AaPp])\.?[Mm]\b\.?")
_TIME = re.compile(r"\b([01]?\d|2[0-3]):([0-5]\d)\b(?!:)")

_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "US$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "", ""),
    "₹": ("rupee", "rupees", "paisa", "paise"),
}
_SCALES = {
    "k": "thousand",
    "thousand": "thousand",
    "m": "million",
    "mn": "million",
    "million": "million",
    "b": "billion",
    "bn": "billion",
    "billion": "billion",
    "trillion": "trillion",
}
_UNITS = {
    "k": "thousand",
    "K": "thousand",
    "km": "kilometers",
    "kg": "kilograms",
    "cm": "centimeters",
    "mm": "millimeters",
    "mph": "miles per hour",
    "km/h": "kilometers per hour",
    "lbs": "pounds",
    "lb": "pounds",
    "ft": "feet",
    "GB": "gigabytes",
    "MB": "megabytes",
    "ms": "milliseconds",
}
_AMOUNT = r"(\d[\d,]*(?:\.\d+)?)"
_SCALE = r"(?:\s?(thousand|million|billion|trillion|k|mn|m|bn|b)\b)?"
_CURRENCY_BEFORE = re.compile(r"(US\$|[$€£¥₹])\s?" + _AMOUNT + _SCALE, re.IGNORECASE)
_CURRENCY_AFTER = re.compile(_AMOUNT + _SCALE + r"\s?([€£¥₹])", re.IGNORECASE)
_PERCENT = re.compile(r"(-?)" + _AMOUNT + r"\s?%")
_ORDINAL = re.compile(r"\b(\d[\d,]*)(st|nd|rd|th)\b", re.IGNORECASE)
_DECADE = re.compile(r"\b(1[1-9]|20)(\d)0s\b")
_YEAR = re.compile(r"(?<![\d.,])(1[1-9]\d\d|20\d\d)(?!\d|[.,]\d)")
_UNIT = re.compile(
    r"(\d)\s?(" + "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True)) + r")\b"
)
_DOTTED = re.compile(r"\b\d+(?:\.\d+){2,}\b")
_FRACTIONS = {
    "1/2": "one half",
    "1/3": "one third",
    "2/3": "two thirds",
    "1/4": "one quarter",
    "3/4": "three quarters",
}
_FRACTION = re.compile(r"(?<![\d/])(?:" + "|".join(_FRACTIONS) + r")(?![\d/])")
_NEGATIVE = re.compile(r"(?<![\w\d])-(?=\d)")
_DECIMAL = re.compile(r"(?<![\d.])(\d[\d,]*)\.(\d+)(?![\d.]*\d)")
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")
_SYMBOLS = {
    "&": " and ",
    "+": " plus ",
    "=": " equals ",
    "@": " at ",
    "%": " percent ",
    "°C": " degrees Celsius ",
    "°F": " degrees Fahrenheit ",
    "°": " degrees ",
    "\u00d7": " times ",
    "÷": " divided by ",
    "<": " less than ",
    ">": " greater than ",
    "~": " about ",
    "*": " ",
    "_": " ",
    "|": ", ",
    "^": " ",
    "`": "'",
    "\\": " ",
}
_SYMBOL = re.compile("|".join(re.escape(s) for s in sorted(_SYMBOLS, key=len, reverse=True)))


def _english(text: str) -> str:
    text = _NUMBER_SIGN.sub("number ", text)
    text = _NAME_TITLE.sub(lambda m: _NAME_TITLES[m.group(1)], text)
    text = _STREET.sub(
        lambda m: f"{m.group(1)} {_with_end(_STREETS[m.group(2)], m.group(3))}", text
    )
    text = _TITLE.sub(lambda m: _TITLES[m.group(1)], text)
    text = _ABBREVIATION.sub(_expand_abbreviation, text)
    text = _AMPM.sub(lambda m: f" {_ampm(m)} ", text)
    text = _TIME.sub(lambda m: f" {_time(m)} ", text)
    text = _CURRENCY_BEFORE.sub(lambda m: f" {_money(m.group(1), m.group(2), m.group(3))} ", text)
    text = _CURRENCY_AFTER.sub(lambda m: f" {_money(m.group(3), m.group(1), m.group(2))} ", text)
    text = _PERCENT.sub(lambda m: f" {_minus(m.group(1))}{_decimal(m.group(2))} percent ", text)
    text = _DOTTED.sub(lambda m: " dot ".join(m.group(0).split(".")), text)
    text = _FRACTION.sub(lambda m: f" {_FRACTIONS[m.group(0)]} ", text)
    text = _UNIT.sub(lambda m: f"{m.group(1)} {_UNITS[m.group(2)]}", text)
    text = _ORDINAL.sub(lambda m: f" {_ordinal(m.group(1))} ", text)
    text = _DECADE.sub(lambda m: f" {_decade(m)} ", text)
    text = _YEAR.sub(lambda m: f" {_num2words(int(m.group(1)), to='year')} ", text)
    text = _NEGATIVE.sub(" minus ", text)
    text = _DECIMAL.sub(lambda m: f" {_decimal(f'{m.group(1)}.{m.group(2)}')} ", text)
    text = _NUMBER.sub(lambda m: f" {_cardinal(m.group(0).replace(',', ''), 'en')} ", text)
    return _SYMBOL.sub(lambda m: _SYMBOLS[m.group(0)], text)


def _expand_abbreviation(match: re.Match[str]) -> str:
    return _with_end(_ABBREVIATIONS[match.group(1)], match.group(2))


def _with_end(word: str, after: str | None) -> str:
    """`word`, and the period of the abbreviation it replaced if that also ended a sentence."""
    return word if after is None else f"{word}.{after}"


def _ampm(match: re.Match[str]) -> str:
    hour, minutes, half = match.group(1), match.group(2), match.group(3).lower()
    spoken = _cardinal(hour, "en")
    if minutes and minutes != "00":
        spoken += " " + _minutes(minutes)
    return f"{spoken} {half} m"


def _time(match: re.Match[str]) -> str:
    hour, minutes = match.group(1), match.group(2)
    if minutes == "00":
        return f"{_cardinal(hour, 'en')} o'clock"
    return f"{_cardinal(hour, 'en')} {_minutes(minutes)}"


def _minutes(minutes: str) -> str:
    if minutes.startswith("0"):
        return "oh " + _cardinal(minutes[1], "en")
    return _cardinal(minutes, "en")


def _money(symbol: str, amount: str, scale: str | None) -> str:
    one, many, small_one, small_many = _CURRENCIES[symbol.upper() if len(symbol) > 1 else symbol]
    amount = amount.replace(",", "")
    if scale:
        return f"{_decimal(amount)} {_SCALES[scale.lower()]} {many}"
    whole, _, fraction = amount.partition(".")
    units = int(whole) if len(whole) <= _MAX_CARDINAL_DIGITS else None
    spoken_whole = f"{_cardinal(whole, 'en')} {one if units == 1 else many}"
    if not fraction or not small_one or len(fraction) != 2:
        if fraction:
            return f"{_decimal(amount)} {many}"
        return spoken_whole
    cents = int(fraction)
    if cents == 0:
        return spoken_whole
    spoken_cents = f"{_cardinal(str(cents), 'en')} {small_one if cents == 1 else small_many}"
    if units == 0:
        return spoken_cents
    return f"{spoken_whole} and {spoken_cents}"


def _ordinal(digits: str) -> str:
    digits = digits.replace(",", "")
    if len(digits) > _MAX_CARDINAL_DIGITS:
        return _digit_by_digit(digits)
    return _num2words(int(digits), to="ordinal")


def _decade(match: re.Match[str]) -> str:
    year = _num2words(int(match.group(1) + match.group(2) + "0"), to="year")
    if year.endswith("y"):
        return year[:-1] + "ies"
    return year + "s"


def _decimal(amount: str) -> str:
    whole, _, fraction = amount.replace(",", "").partition(".")
    spoken = _cardinal(whole, "en")
    if fraction:
        spoken += " point " + _digit_by_digit(fraction)
    return spoken


def _minus(sign: str) -> str:
    return "minus " if sign else ""


def _digit_by_digit(digits: str) -> str:
    return " ".join(_DIGITS[int(d)] for d in digits if d.isdigit())


_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ---- any language -----------------------------------------------------------------------------

# Languages of our voices that num2words writes out (Chinese is left to the voice).
_NUM2WORDS_LANGUAGES = {"en", "de", "es", "fr", "it", "vi"}


def _cardinal(digits: str, language: str) -> str:
    if not digits.isascii() or not digits.isdigit():
        return digits
    if len(digits) > _MAX_CARDINAL_DIGITS:
        return _digit_by_digit(digits) if language == "en" else " ".join(digits)
    return _num2words(int(digits), lang=language)


def _num2words(number: int, **options: str) -> str:
    """num2words, or the digits themselves where it cannot say the number."""
    convert: Callable[..., str] = num2words
    try:
        return convert(number, **options).replace("-", " ")
    except (OverflowError, NotImplementedError, InvalidOperation, ValueError, TypeError):
        return str(Decimal(number))

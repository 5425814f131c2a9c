"""A GBNF grammar that lets llama.cpp sample only valid tool calls.

The grammar starts just after an opening `<tool_call>` tag (the prompt or the model wrote it) and
accepts `{"name": "<tool>", "arguments": <that tool's arguments>}</tool_call>`, then optionally more
calls, whitespace between them, and then nothing but the end of generation. Each tool's arguments
follow its JSON Schema, turned into GBNF by llama-cpp-python's `SchemaConverter`, with two changes:
integer bounds (`minimum`, `maximum`, exclusive ones), which it ignores and tool schemas use a lot
("seconds >= 1"), are kept; string `pattern`s are left out, since it translates few regexes (no
digit, word or space classes), into grammars llama.cpp may refuse or take ages to parse, and
without JSON escapes. What the grammar leaves out (patterns, `multipleOf`, number bounds, string
formats it does not know) makes it looser than the schema; the servicer still checks every call.
A schema the converter cannot turn into a grammar at all (`not`, `if`, a `$ref` to another
document), or into one llama.cpp cannot parse, is INVALID_ARGUMENT for that tool.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

from services.llm.tools import CLOSE_TAG, OPEN_TAG, Tool
from services.runtime.errors import InvalidArgument

# What every call begins with after its opening tag; the grammar writes it the one way.
CALL_HEAD = '{"name": "'
# Whitespace the grammar allows after an opening tag and between calls.
_GAP = "[ \\n]?"
# The most digits of an integer without an upper bound (the converter's own limit).
_MAX_DIGITS = 16
_INTEGER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# A character of a JSON string; the converter's own lets control characters through unescaped,
# which json.loads then refuses.
_JSON_CHAR = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" '
    "[0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])"
)
# A GBNF string literal, a character class, or a name (rule names and nothing else).
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z0-9-]+')


@dataclass(frozen=True)
class ToolGrammar:
    """The rules for calls to some tools; `gbnf` gives the grammar to start with.

    Build it with `tool_grammar`.
    """

    rules: str

    def gbnf(self, written: str = "") -> str:
        """The grammar, given the text the model `written` after the opening tag already.

        `written` must be what `accepts` let through: whitespace, then a beginning of the call's
        fixed head.
        """
        core = written.lstrip(" \n")
        head = f"{_GAP} {literal(CALL_HEAD)}" if not core else literal(CALL_HEAD[len(core) :])
        return f"root ::= {head} call-rest call-more\n{self.rules}"

    @staticmethod
    def accepts(written: str) -> bool:
        """True when the grammar can go on from `written` (the text after the opening tag)."""
        return CALL_HEAD.startswith(written.lstrip(" \n"))


def tool_grammar(
    tools: tuple[Tool, ...],
    indices: tuple[int, ...],
    parses: Callable[[str], bool] | None = None,
) -> ToolGrammar:
    """The grammar for calls to `tools`.

    Args:
        tools: The tools offered (at least one).
        indices: Each tool's index in the request, for the field an error names.
        parses: Whether llama.cpp parses a grammar (`parser_of`); each tool's is checked.

    Raises:
        InvalidArgument: A tool's schema cannot be turned into a grammar.
    """
    choices: list[str] = []
    rules: list[str] = []
    for number, (tool, index) in enumerate(zip(tools, indices, strict=True)):
        prefix = f"tool{number}-"
        try:
            root, converted = _convert(tool.parameters)
        except Exception as err:  # the converter fails with asserts and errors of all kinds
            detail = str(err)[:200]
            raise InvalidArgument(
                f"the llama_cpp backend cannot constrain calls to this schema: {detail}",
                field=f"start.tools[{index}].parameters_json",
            ) from None
        own = _prefixed(converted, prefix)
        if parses is not None and not parses("\n".join([f"root ::= {prefix}{root}", *own])):
            raise InvalidArgument(
                "the llama_cpp backend cannot constrain calls to this schema: its grammar "
                "does not parse",
                field=f"start.tools[{index}].parameters_json",
            )
        rules.extend(own)
        name = literal(tool.name + '", "arguments": ')
        choices.append(f"{name} {prefix}{root}")
    lines = [
        f"call-rest ::= ({' | '.join(choices)}) {literal('}' + CLOSE_TAG)}",
        f"call-more ::= ({_GAP} {literal(OPEN_TAG)} {_GAP} {literal(CALL_HEAD)} call-rest)*",
        *rules,
    ]
    return ToolGrammar("\n".join(lines))


def parser_of(vocab: Any) -> Callable[[str], bool]:
    """A check that llama.cpp parses a grammar (root rule `root`) for a model's vocabulary.

    Safe from any thread: it only reads the vocabulary.
    """

    def parses(grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    return parses


def literal(text: str) -> str:
    """A GBNF string literal of `text`."""
    return json.dumps(text)


def _convert(schema: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The converter's root rule name and rules for one arguments schema."""
    # llama-cpp-python leaves the converter unannotated.
    converter = _Converter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    # resolve_refs rewrites the $refs it follows: the schema is the request's, so work on a copy.
    resolved = converter.resolve_refs(copy.deepcopy(schema), "tool")
    root = converter.visit(resolved, "")
    rules = dict(converter._rules)
    if "char" in rules:
        rules["char"] = _JSON_CHAR
    return str(root), rules


def _prefixed(rules: dict[str, str], prefix: str) -> list[str]:
    """The rules with every rule name prefixed, so that two tools' rules never collide."""

    def rename(match: re.Match[str]) -> str:
        return prefix + match[0] if match[0] in rules else match[0]

    return [f"{prefix}{name} ::= {_GBNF_TOKEN.sub(rename, body)}" for name, body in rules.items()]


class _Converter(SchemaConverter):
    """llama-cpp-python's converter, with bounded integers."""

    def visit(self, schema: Any, name: str) -> Any:
        if isinstance(schema, dict) and "pattern" in schema:
            schema = {key: value for key, value in schema.items() if key != "pattern"}
        if (
            isinstance(schema, dict)
            and schema.get("type") == "integer"
            and any(key in schema for key in _INTEGER_BOUNDS)
        ):
            low, high = _integer_bounds(schema)
            rule_name = f"{name}-" if name in RESERVED_NAMES else name or "root"
            rule = f"({integer_range(low, high)}) space"
            return self._add_rule(rule_name, rule)  # type: ignore[no-untyped-call]
        return super().visit(schema, name)  # type: ignore[no-untyped-call]


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    lows = [math.ceil(schema["minimum"])] if "minimum" in schema else []
    if "exclusiveMinimum" in schema:
        lows.append(math.floor(schema["exclusiveMinimum"]) + 1)
    highs = [math.floor(schema["maximum"])] if "maximum" in schema else []
    if "exclusiveMaximum" in schema:
        highs.append(math.ceil(schema["exclusiveMaximum"]) - 1)
    low, high = max(lows, default=None), min(highs, default=None)
    if low is not None and high is not None and low > high:
        raise ValueError(f"no integer is between {low} and {high}")
    return low, high


def integer_range(low: int | None, high: int | None) -> str:
    """A GBNF expression for the integers from `low` to `high` (None: no bound), JSON style."""
    parts = []
    if low is None or low < 0:
        # -n for n from max(1, -high) to -low.
        smallest = 1 if high is None or high >= 0 else -high
        parts.append(f'"-" ({_naturals(smallest, None if low is None else -low)})')
    if high is None or high >= 0:
        parts.append(_naturals(max(low or 0, 0), high))
    return " | ".join(f"({part})" for part in parts)


def _naturals(low: int, high: int | None) -> str:
    """The numbers from `low` to `high` (None: up to `_MAX_DIGITS` digits), no leading zeros."""
    if high is None:
        digits = len(str(low))
        same = _same_length(str(low), "9" * digits)
        if digits >= _MAX_DIGITS:
            return same
        more = _MAX_DIGITS - digits - 1
        longer = "[1-9]" + " [0-9]" * digits + " ([0-9]" * more + ")?" * more
        return f"({same}) | ({longer})"
    ranges = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        first = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        last = min(high, 10**digits - 1)
        if first <= last:
            ranges.append(_same_length(str(first), str(last)))
    return " | ".join(f"({r})" for r in ranges)


def _same_length(first: str, last: str) -> str:
    """The numbers from `first` to `last`, written with the same number of digits."""
    if first == last:
        return literal(first)
    if first[0] == last[0]:
        return f"{literal(first[0])} ({_same_length(first[1:], last[1:])})"
    rest = len(first) - 1
    any_rest = " [0-9]" * rest  # unrolled: `{n}` could be read as a rule named n when renamed
    starts_low = first[1:] == "0" * rest
    ends_high = last[1:] == "9" * rest
    alternatives = []
    if not starts_low:
        alternatives.append(f"{literal(first[0])} ({_same_length(first[1:], '9' * rest)})")
    low_digit = int(first[0]) + (0 if starts_low else 1)
    high_digit = int(last[0]) - (0 if ends_high else 1)
    if low_digit <= high_digit:
        alternatives.append(f"[{low_digit}-{high_digit}]{any_rest}")
    if not ends_high:
        alternatives.append(f"{literal(last[0])} ({_same_length('0' * rest, last[1:])})")
    return " | ".join(alternatives)

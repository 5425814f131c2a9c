"""The tool calls of one llama_cpp generation: answer text kept apart, and when to constrain.

With tool choice AUTO the model writes freely; its answer text goes through `ToolCallSplitter`, and
once it has written an opening `<tool_call>` the backend switches the sequence to the tool-call
grammar (`constrain`), which takes over just after the tag. With REQUIRED or NAMED the prompt
opened the call and the grammar holds from the first token. From the switch on every token is call
text, never spoken; at the end each completed call becomes a `ToolCall` (an unfinished one, cut by
max_tokens, is dropped). A call identical to one made before in the same turn ends the generation:
small models, once in the grammar's loop of calls, tend to repeat their call until max_tokens.
"""

from __future__ import annotations

import json

from services.llm.backends.llama_tools import ToolGrammar
from services.llm.tools import OPEN_TAG, ToolCall, ToolCallSplitter, call_from_json


class ToolCalls:
    """Calls cut out of one generation's text.

    Args:
        grammar: The grammar of the offered tools.
        opened: The prompt ends with an opening tag: the model starts inside a call.
    """

    def __init__(self, grammar: ToolGrammar, opened: bool) -> None:
        self.grammar = grammar
        self.constrained = opened  # the grammar holds: every token is call text
        self.switch_due = False  # the model opened a call: constrain before its next token
        self.repeated = False  # the model repeated a call: end the generation
        self._splitter = ToolCallSplitter()
        self._recent = ""  # the end of the answer text, where an opening tag may have begun
        self._written = ""  # what the model wrote after the tag it opened, in the same token
        self._texts: list[str] = []
        if opened:
            self._splitter.push(OPEN_TAG)

    def initial_grammar(self) -> str:
        """The grammar from the first token on; empty while the model may answer freely."""
        return self.grammar.gbnf() if self.constrained else ""

    def answer(self, text: str) -> str:
        """The answer text of `text`, before any call; the rest waits or is call text."""
        if self.switch_due:
            self._written += text  # more of the token that opened the call
            return ""
        window = self._recent + text
        self._recent = window[-len(OPEN_TAG) :]
        pieces = self._splitter.push(text)
        if self._splitter.calls_seen:
            self.switch_due = True
            self._written = window[window.rfind(OPEN_TAG) + len(OPEN_TAG) :]
        return "".join(piece.text for piece in pieces if not piece.call)

    def switch(self, held: str = "") -> str:
        """Enter the call the model opened; returns the grammar to constrain it from here.

        Args:
            held: Text after the tag that an earlier filter held back (a possible think tag).
        """
        written = self._written + held
        if not ToolGrammar.accepts(written):
            # The tag's last token ran on into text no call begins with: the grammar starts
            # after it, and the call is what the grammar writes.
            written = ""
        self.switch_due = False
        self.constrained = True
        self._splitter = ToolCallSplitter()
        self.add_call_text(OPEN_TAG + written)
        return self.grammar.gbnf(written)

    def add_call_text(self, text: str) -> None:
        """Text of constrained tokens (all of it belongs to calls)."""
        for piece in self._splitter.push(text):
            if not piece.call:
                continue
            if _same_call(piece.text) in map(_same_call, self._texts):
                self.repeated = True
            else:
                self._texts.append(piece.text)

    def held_answer(self) -> str:
        """At the end: answer text held back as a possible opening tag."""
        return "".join(piece.text for piece in self._splitter.flush())

    def made(self) -> list[ToolCall]:
        """The completed calls, in order."""
        calls = (call_from_json(text) for text in self._texts)
        return [call for call in calls if call is not None]


def _same_call(text: str) -> str:
    """A call's text, written the same way whatever its spacing and key order."""
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except json.JSONDecodeError:
        return text

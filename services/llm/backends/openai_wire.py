"""OpenAI's chat wire format for what our contract adds: tool calls, tool results, tool choice.

Shared by the backends that speak it: `openai_upstream` over HTTP, `vllm` to its chat template
(both take OpenAI's message shapes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.llm.backend import ChatTurn
from services.llm.tools import ToolCall, ToolChoice, ToolChoiceMode, new_call_id


def openai_messages(turns: Sequence[ChatTurn]) -> list[dict[str, Any]]:
    """The conversation as OpenAI's chat API writes it, tool calls and results included.

    An assistant turn that only made calls keeps its empty content as "": vLLM, llama-server
    and llama_cpp.server all take it, and templates that concatenate the content cannot fail on
    a null.
    """
    messages: list[dict[str, Any]] = []
    for turn in turns:
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.tool_calls:
            message["tool_calls"] = [call.openai() for call in turn.tool_calls]
        if turn.tool_call_id:
            message["tool_call_id"] = turn.tool_call_id
        messages.append(message)
    return messages


def template_messages(turns: Sequence[ChatTurn]) -> list[dict[str, Any]]:
    """The conversation for a Hugging Face chat template, tool calls and results included.

    Call arguments become objects, as the templates expect (they write them with `tojson`) and
    as vLLM's own server passes them; arguments that are not a JSON object stay text. A tool
    result also carries its tool's `name`, which some templates print.
    """
    names = {call.id: call.name for turn in turns for call in turn.tool_calls}
    messages = openai_messages(turns)
    for message in messages:
        if message.get("tool_call_id") in names:
            message["name"] = names[message["tool_call_id"]]
        for call in message.get("tool_calls", ()):
            function = call["function"]
            try:
                value = json.loads(function["arguments"] or "{}")
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                function["arguments"] = value
    return messages


def openai_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    """Our tool choice as OpenAI's `tool_choice`."""
    if choice.mode is ToolChoiceMode.NAMED:
        return {"type": "function", "function": {"name": choice.name}}
    return str(choice.mode.value)  # "auto", "none", "required"


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallFragments:
    """The calls of one streamed choice, joined from their `delta.tool_calls` fragments.

    A call's first fragment carries its index, id and name, later ones more of its arguments;
    calls may interleave. Some servers (llama_cpp.server) repeat the id and name in every
    fragment, so the first non-empty id and name are kept and only arguments are joined.
    """

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}
        self._last = -1

    def add(self, fragments: Sequence[Any]) -> None:
        """Fold one delta's fragments in."""
        for fragment in fragments:
            if not isinstance(fragment, Mapping):
                continue
            index = self._index_of(fragment)
            call = self._calls.setdefault(index, _PartialCall())
            self._last = index
            call.id = call.id or str(fragment.get("id") or "")
            function = fragment.get("function") or {}
            call.name = call.name or str(function.get("name") or "")
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call.arguments.append(arguments)
            elif arguments is not None:  # an object, where a server sends one whole
                call.arguments.append(json.dumps(arguments, ensure_ascii=False))

    def take(self) -> list[ToolCall]:
        """The calls so far, in index order; then none.

        An upstream that sent no id gets ours, a call without arguments "{}".
        """
        calls = [
            ToolCall(call.id or new_call_id(), call.name, "".join(call.arguments) or "{}")
            for _, call in sorted(self._calls.items())
        ]
        self._calls.clear()
        return calls

    def _index_of(self, fragment: Mapping[str, Any]) -> int:
        index = fragment.get("index")
        if isinstance(index, int):
            return index
        # No index: a new id begins a new call, anything else continues the last one.
        last = self._calls.get(self._last)
        if last is None or (fragment.get("id") and fragment.get("id") != last.id):
            return max(self._calls, default=-1) + 1
        return self._last

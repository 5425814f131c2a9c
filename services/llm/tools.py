"""Tool calls: the tools a request offers, the calls a model makes, and checking them.

A backend gets the request's `Tool`s and `ToolChoice` and yields a `ToolCall` per call the model
makes; the servicer checks each call's arguments against its tool's schema (`check_arguments`)
and streams it to the client, which runs the tool and sends the result back in a `tool` message.

Models that write their calls into the text stream (llama_cpp, vllm) use one format, the one that
Hermes, Qwen and many chat templates teach:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
`ToolCallSplitter` cuts those calls out of the text, the way `ThinkSplitter` cuts out reasoning:
the text before the first call is the answer; what follows is only calls.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import jsonschema

from services.llm.reasoning import partial_tag_suffix

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolChoiceMode(Enum):
    """Whether the model may, must or must not call a tool."""

    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True)
class ToolChoice:
    """A request's tool choice; `name` only with NAMED."""

    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str = ""


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is a checked JSON Schema object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_ARGUMENTS), hash=False)

    def openai(self) -> dict[str, Any]:
        """The tool as OpenAI's chat API (and chat templates) describe one."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """One call: made by the model (a backend event), or sent back in the conversation.

    `error` is set by the servicer when the arguments do not match the tool's schema.
    """

    id: str
    name: str
    arguments: str  # a JSON object
    error: str = ""

    def openai(self) -> dict[str, Any]:
        """The call as OpenAI's chat API (and chat templates) write one in an assistant message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    """A call id that is unique in practice: "call_" and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


def offered(tools: tuple[Tool, ...], choice: ToolChoice) -> tuple[Tool, ...]:
    """The tools the model is shown: none with NONE, only the named one with NAMED."""
    if choice.mode is ToolChoiceMode.NONE:
        return ()
    if choice.mode is ToolChoiceMode.NAMED:
        return tuple(tool for tool in tools if tool.name == choice.name)
    return tools


def check_arguments(tool: Tool | None, arguments: str) -> str:
    """Why a model's call does not fit its tool, or "" when it does."""
    if tool is None:
        return "the model called a tool that the request does not offer"
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError as err:
        return f"the arguments are not JSON: {err.msg} at character {err.pos}"
    if not isinstance(value, dict):
        return "the arguments are not a JSON object"
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(tool.parameters).iter_errors(value)
    )
    if error is None:
        return ""
    where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
    return f"the arguments do not match the schema at {where}: {error.message}"


def call_from_json(text: str) -> ToolCall | None:
    """A call written as `{"name": ..., "arguments": {...}}`, or None when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        return ToolCall(new_call_id(), value["name"], arguments)
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True)
class CallText:
    """Answer text (to speak) or the whole text of a call (between the tags)."""

    text: str
    call: bool


class ToolCallSplitter:
    """Cuts `<tool_call>...</tool_call>` out of the answer text as it streams.

    `push` returns answer text that is decided and the text of each call completed; a piece that
    might begin the opening tag is held back until the next text decides it. Once a call has
    begun, only calls follow: text between or after them is dropped (a grammar forbids it).
    """

    def __init__(self) -> None:
        self.in_call = False
        self.calls_seen = False
        self._held = ""

    def push(self, text: str) -> list[CallText]:
        """Add answer text; returns what it completed."""
        buffer = self._held + text
        self._held = ""
        out: list[CallText] = []
        while buffer:
            tag = CLOSE_TAG if self.in_call else OPEN_TAG
            at = buffer.find(tag)
            if at >= 0:
                before, buffer = buffer[:at], buffer[at + len(tag) :]
                if self.in_call:
                    out.append(CallText(before.strip(), True))
                elif before and not self.calls_seen:
                    out.append(CallText(before, False))
                self.calls_seen = True
                self.in_call = not self.in_call
                continue
            if self.in_call:
                self._held = buffer
            else:
                keep = partial_tag_suffix(buffer, OPEN_TAG)
                if not self.calls_seen and len(buffer) > keep:
                    out.append(CallText(buffer[: len(buffer) - keep], False))
                self._held = buffer[len(buffer) - keep :]
            break
        return out

    def flush(self) -> list[CallText]:
        """At the end: held-back answer text (an unfinished call is dropped)."""
        held, self._held = self._held, ""
        if held and not self.in_call and not self.calls_seen:
            return [CallText(held, False)]
        return []


def tools_instruction(tools: tuple[Tool, ...]) -> str:
    """A system prompt part that teaches a model without a tool-aware template to call tools."""
    listed = "\n".join(json.dumps(tool.openai(), ensure_ascii=False) for tool in tools)
    return (
        "You can call these tools:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call one, reply with only:\n"
        f'{OPEN_TAG}{{"name": "<tool name>", "arguments": {{<arguments>}}}}{CLOSE_TAG}\n'
        "You get its result in the next message."
    )

"""A StartGeneration's tools, tool choice and tool messages, checked: INVALID_ARGUMENT + field."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import jsonschema

from nemotron.speech.v1 import llm_pb2
from services.llm.tools import NO_ARGUMENTS, Tool, ToolCall, ToolChoice, ToolChoiceMode
from services.runtime.errors import InvalidArgument
from services.runtime.ids import check_client_id

MAX_TOOLS = 32
MAX_DESCRIPTION_CHARS = 1024
MAX_SCHEMA_BYTES = 16384
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CHOICES = {
    llm_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode.AUTO,
    llm_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    llm_pb2.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    llm_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    llm_pb2.TOOL_CHOICE_MODE_NAMED: ToolChoiceMode.NAMED,
}


def parse_tools(tools: Sequence[llm_pb2.Tool]) -> tuple[Tool, ...]:
    """The request's tools, each with a name, a description and a valid parameters schema."""
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(
            f"{len(tools)} tools were given; at most {MAX_TOOLS} are accepted", field="start.tools"
        )
    parsed: list[Tool] = []
    names: set[str] = set()
    for index, tool in enumerate(tools):
        field = f"start.tools[{index}]"
        if not _NAME.fullmatch(tool.name):
            raise InvalidArgument(
                f"tool name {tool.name!r} must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -",
                field=f"{field}.name",
            )
        if tool.name in names:
            raise InvalidArgument(f"tool {tool.name!r} is given twice", field=f"{field}.name")
        names.add(tool.name)
        if len(tool.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(
                f"the description is {len(tool.description)} characters; at most "
                f"{MAX_DESCRIPTION_CHARS} are accepted",
                field=f"{field}.description",
            )
        parameters = _schema(tool.parameters_json, f"{field}.parameters_json")
        parsed.append(Tool(tool.name, tool.description, parameters))
    return tuple(parsed)


def _schema(text: str, field: str) -> dict[str, Any]:
    if not text.strip():
        return dict(NO_ARGUMENTS)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(
            f"the schema is {len(text.encode())} bytes; at most {MAX_SCHEMA_BYTES} are accepted",
            field=field,
        )
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidArgument(
            f"the schema is not JSON: {err.msg} at character {err.pos}", field=field
        ) from None
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise InvalidArgument(
            'the schema must be a JSON Schema object with "type": "object" (the arguments are '
            "named)",
            field=field,
        )
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(str(part) for part in err.absolute_path) or "(top level)"
        raise InvalidArgument(
            f"the schema is not a valid JSON Schema (draft 2020-12) at {where}: {err.message}",
            field=field,
        ) from None
    return schema


def tool_choice(choice: llm_pb2.ToolChoice, tools: tuple[Tool, ...]) -> ToolChoice:
    """The tool choice; REQUIRED and NAMED need tools, and NAMED one of them."""
    mode = _CHOICES.get(choice.mode)
    if mode is None:
        raise InvalidArgument(
            f"tool choice mode {choice.mode} is unknown; use AUTO, NONE, REQUIRED or NAMED",
            field="start.tool_choice.mode",
        )
    if mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.NAMED) and not tools:
        raise InvalidArgument(
            f"tool choice {mode.name} needs tools; none were given", field="start.tool_choice.mode"
        )
    if mode is ToolChoiceMode.NAMED and choice.name not in {tool.name for tool in tools}:
        raise InvalidArgument(
            f"tool choice names {choice.name!r}, which is not one of the tools given",
            field="start.tool_choice.name",
        )
    if mode is not ToolChoiceMode.NAMED and choice.name:
        raise InvalidArgument(
            "a tool choice name is only taken with TOOL_CHOICE_MODE_NAMED",
            field="start.tool_choice.name",
        )
    return ToolChoice(mode, choice.name if mode is ToolChoiceMode.NAMED else "")


def turn_tool_calls(
    message: llm_pb2.ChatMessage, field: str, earlier: Sequence[Any]
) -> tuple[ToolCall, ...]:
    """An assistant message's calls, checked; a tool message's call id, checked against `earlier`.

    Args:
        message: The chat message.
        field: Its field path, e.g. "start.messages[3]".
        earlier: The turns before it (`ChatTurn`s).
    """
    if message.tool_calls and message.role != "assistant":
        raise InvalidArgument(
            "only an assistant message carries tool calls", field=f"{field}.tool_calls"
        )
    if message.role == "tool":
        made = {call.id for turn in earlier for call in turn.tool_calls}
        if not message.tool_call_id or message.tool_call_id not in made:
            raise InvalidArgument(
                f"tool message for call {message.tool_call_id!r}, which no earlier assistant "
                "message made; give the id of the call this result answers",
                field=f"{field}.tool_call_id",
            )
    elif message.tool_call_id:
        raise InvalidArgument(
            "only a tool message names a tool_call_id", field=f"{field}.tool_call_id"
        )
    calls = []
    for index, call in enumerate(message.tool_calls):
        where = f"{field}.tool_calls[{index}]"
        check_client_id(call.id, f"{where}.id")
        if not call.id:
            raise InvalidArgument("the call has no id", field=f"{where}.id")
        if not _NAME.fullmatch(call.name):
            raise InvalidArgument(f"tool name {call.name!r} is not valid", field=f"{where}.name")
        try:
            arguments = json.loads(call.arguments_json or "{}")
        except json.JSONDecodeError as err:
            raise InvalidArgument(
                f"the arguments are not JSON: {err.msg} at character {err.pos}",
                field=f"{where}.arguments_json",
            ) from None
        if not isinstance(arguments, dict):
            raise InvalidArgument(
                "the arguments must be a JSON object", field=f"{where}.arguments_json"
            )
        calls.append(ToolCall(call.id, call.name, call.arguments_json or "{}"))
    return tuple(calls)

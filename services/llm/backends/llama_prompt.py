"""The prompt of a GGUF model: its chat template, with reasoning switched on or off.

The template is the GGUF's own (`tokenizer.chat_template`), or a file that replaces it
(`--chat-template`), run by llama-cpp-python's Jinja2 formatter. Reasoning is switched the way
the seed's stack does it: a template that takes `enable_thinking` gets it; a reasoning model whose
template does not (it writes `<think>` blocks but has no switch) gets an empty `<think></think>`
block after the generation prompt when reasoning is off, so it answers at once.

Tools: a template that takes `tools` (it names the variable) gets the offered tools and the
conversation in OpenAI's form (assistant `tool_calls`, `tool` messages with their call id), and
teaches the model its own way. Any other template (SmolLM2's ChatML) gets the call format taught
in the system prompt (`tools_instruction`), the calls of earlier turns written into the assistant
text as `<tool_call>{...}</tool_call>`, and each run of tool results as one user message of
`<tool_response>` blocks, which every template accepts; a small model may go on to write such a
block itself, so its tags end the answer there (`RenderedPrompt.stops`). A prompt may end with an
opened call (`open_call`: tool choice REQUIRED or NAMED), so that the model's first token is in
the call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.llm.backend import ChatTurn
from services.llm.backends.llama_model import LlamaModel
from services.llm.backends.openai_wire import template_messages
from services.llm.reasoning import CLOSE_TAG, OPEN_TAG, Reasoning, template_takes_enable_thinking
from services.llm.tools import CLOSE_TAG as CALL_CLOSE
from services.llm.tools import OPEN_TAG as CALL_OPEN
from services.llm.tools import Tool, ToolCall, tools_instruction

_TAKES_TOOLS = re.compile(r"\btools\b")
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt's tokens, and whether the model's output starts inside a reasoning block.

    `stops` end the answer besides the request's own stop strings (markup the model must not
    write).
    """

    tokens: list[int]
    starts_in_reasoning: bool
    stops: tuple[str, ...] = ()


class ChatPrompt:
    """Renders conversations for one model.

    Args:
        model: The loaded model (its template, special tokens and tokenizer).
        template_file: A Jinja chat template that replaces the GGUF's own; empty keeps it.
    """

    def __init__(self, model: LlamaModel, template_file: str = "") -> None:
        template = Path(template_file).read_text(encoding="utf-8") if template_file else ""
        template = template or model.chat_template
        if not template:
            raise ValueError(
                "the model carries no chat template (GGUF tokenizer.chat_template); use a GGUF "
                "converted with one, or give one with --chat-template"
            )
        self.model = model
        self.takes_enable_thinking = template_takes_enable_thinking(template)
        self.takes_tools = bool(_TAKES_TOOLS.search(template))
        # A reasoning model without a switch: its template or vocabulary knows the think tags.
        self.thinks = self.takes_enable_thinking or OPEN_TAG in template or self._tag_is_a_token()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.eos_text,
            bos_token=model.bos_text,
            add_generation_prompt=True,
        )

    def render(
        self,
        messages: tuple[ChatTurn, ...],
        reasoning: Reasoning,
        tools: tuple[Tool, ...] = (),
        open_call: bool = False,
    ) -> RenderedPrompt:
        """The prompt for `messages` with reasoning as asked.

        Args:
            messages: The conversation; its tool calls and results render with or without tools.
            reasoning: Whether the model reasons first (keep it off with `open_call`).
            tools: The tools the model is shown.
            open_call: End the prompt with an opening `<tool_call>` tag.
        """
        options: dict[str, Any] = (
            {"enable_thinking": reasoning.enabled} if self.takes_enable_thinking else {}
        )
        stops: tuple[str, ...] = ()
        if self.takes_tools:
            chat = template_messages(messages)
            if tools:
                options["tools"] = [tool.openai() for tool in tools]
        else:
            chat = text_messages(messages, tools)
            if tools or any(turn.role == "tool" for turn in messages):
                stops = (RESPONSE_OPEN, RESPONSE_CLOSE)
        text = self._formatter(messages=chat, **options).prompt  # type: ignore[arg-type]
        if self.thinks and not reasoning.enabled and not self.takes_enable_thinking:
            text += OPEN_TAG + CLOSE_TAG + "\n"
        if open_call:
            text += CALL_OPEN
        inside = _ends_inside_reasoning(text)
        tokens = self.model.tokenize(text.encode(), add_special=False, parse_special=True)
        return RenderedPrompt(tokens, inside, stops)

    def _tag_is_a_token(self) -> bool:
        tokens = self.model.tokenize(OPEN_TAG.encode(), add_special=False, parse_special=True)
        return len(tokens) == 1


def _ends_inside_reasoning(prompt: str) -> bool:
    """True when the generation prompt opened a reasoning block that it did not close."""
    return prompt.rfind(OPEN_TAG) > prompt.rfind(CLOSE_TAG)


def text_messages(messages: tuple[ChatTurn, ...], tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """The conversation in system, user and assistant text, for a template that takes no tools.

    The instruction for `tools` joins the leading system message (or becomes one); calls are
    written into the assistant's text; a run of tool results becomes one user message.
    """
    chat: list[dict[str, Any]] = []
    after_result = False
    for turn in messages:
        if turn.role == "tool":
            response = f"{RESPONSE_OPEN}\n{turn.content}\n{RESPONSE_CLOSE}"
            if after_result:
                chat[-1]["content"] += "\n" + response
            else:
                chat.append({"role": "user", "content": response})
            after_result = True
            continue
        after_result = False
        content = turn.content
        if turn.tool_calls:
            calls = "\n".join(call_text(call) for call in turn.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        chat.append({"role": turn.role, "content": content})
    if tools:
        instruction = tools_instruction(tools)
        if chat and chat[0]["role"] == "system":
            chat[0]["content"] = f"{chat[0]['content']}\n\n{instruction}"
        else:
            chat.insert(0, {"role": "system", "content": instruction})
    return chat


def call_text(call: ToolCall) -> str:
    """A call as the model writes it: `<tool_call>{"name": ..., "arguments": ...}</tool_call>`."""
    try:
        arguments: Any = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        arguments = call.arguments  # kept as the client sent it
    body = json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"

"""The prompt of a GGUF model: its chat template, with reasoning switched on or off.

The template is the GGUF's own (`tokenizer.chat_template`), or a file that replaces it
(`--chat-template`), run by llama-cpp-python's Jinja2 formatter. Reasoning is switched the way
the seed's stack does it: a template that takes `enable_thinking` gets it; a reasoning model whose
template does not (it writes `<think>` blocks but has no switch) gets an empty `<think></think>`
block after the generation prompt when reasoning is off, so it answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.llm.backend import ChatTurn
from services.llm.backends.llama_model import LlamaModel
from services.llm.reasoning import CLOSE_TAG, OPEN_TAG, Reasoning, template_takes_enable_thinking


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt's tokens, and whether the model's output starts inside a reasoning block."""

    tokens: list[int]
    starts_in_reasoning: bool


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
        # A reasoning model without a switch: its template or vocabulary knows the think tags.
        self.thinks = self.takes_enable_thinking or OPEN_TAG in template or self._tag_is_a_token()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.eos_text,
            bos_token=model.bos_text,
            add_generation_prompt=True,
        )

    def render(self, messages: tuple[ChatTurn, ...], reasoning: Reasoning) -> RenderedPrompt:
        """The prompt for `messages` with reasoning as asked."""
        options: dict[str, Any] = (
            {"enable_thinking": reasoning.enabled} if self.takes_enable_thinking else {}
        )
        text = self._formatter(
            messages=[{"role": m.role, "content": m.content} for m in messages],  # type: ignore[misc]
            **options,
        ).prompt
        if self.thinks and not reasoning.enabled and not self.takes_enable_thinking:
            text += OPEN_TAG + CLOSE_TAG + "\n"
        inside = _ends_inside_reasoning(text)
        tokens = self.model.tokenize(text.encode(), add_special=False, parse_special=True)
        return RenderedPrompt(tokens, inside)

    def _tag_is_a_token(self) -> bool:
        tokens = self.model.tokenize(OPEN_TAG.encode(), add_special=False, parse_special=True)
        return len(tokens) == 1


def _ends_inside_reasoning(prompt: str) -> bool:
    """True when the generation prompt opened a reasoning block that it did not close."""
    return prompt.rfind(OPEN_TAG) > prompt.rfind(CLOSE_TAG)

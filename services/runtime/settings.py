"""Typed server settings, filled from flags and environment variables.

Each server has one settings class derived from `ServerSettings`; its fields are the single list
of what can be configured. Every field is an environment variable (`NEMOTRON_<SERVICE>_<FIELD>`,
e.g. `NEMOTRON_ASR_PORT`) and a flag (`--port`); a flag wins over the environment, which wins over
the default. `nemotron-speech serve asr --help` prints them all.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """What every server shares. Subclasses set `env_prefix` and add their backend fields."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    host: str = Field(
        "127.0.0.1", description="Address to bind; 0.0.0.0 exposes the server to the network."
    )
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    backend: str = Field("", description="Model engine, by registry name.")
    max_streams: int = Field(
        16, ge=1, description="Concurrent streams served; more get RESOURCE_EXHAUSTED."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request or response message, in bytes."
    )
    shutdown_grace_s: float = Field(
        5.0, ge=0, description="On SIGTERM/SIGINT, seconds that open streams get to finish."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_content: bool = Field(
        False,
        description="Log transcripts, texts and prompts (off: only sizes and ids are logged).",
    )


Settings = TypeVar("Settings", bound=ServerSettings)


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[ServerSettings]) -> None:
    """Add one `--flag` per settings field, with its description and env variable as help."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"{prefix}{name}".upper()
        help_text = f"{field.description or ''} [env {env}; default {field.default!r}]"
        annotation = _strip_optional(field.annotation)
        if annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif get_origin(annotation) is Literal:
            parser.add_argument(
                flag, dest=name, choices=list(get_args(annotation)), default=None, help=help_text
            )
        else:
            kind = annotation if annotation in (int, float) else str
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def settings_from_flags(settings_cls: type[Settings], namespace: argparse.Namespace) -> Settings:
    """Build the settings: given flags override environment variables and defaults."""
    given = {
        name: getattr(namespace, name)
        for name in settings_cls.model_fields
        if getattr(namespace, name, None) is not None
    }
    return settings_cls(**given)


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation

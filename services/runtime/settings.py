"""Typed server settings, filled from flags and environment variables.

Each server has one settings class derived from `ServerSettings`; its fields are the single list
of what can be configured. Every field is an environment variable (`NEMOTRON_<SERVICE>_<FIELD>`,
e.g. `NEMOTRON_ASR_PORT`) and a flag (`--port`); a flag wins over the environment, which wins over
the default. `nemotron-speech serve asr --help` prints them all.

The security settings (TLS, tokens, `insecure`) are shared by the servers of one machine, so each
also falls back to an unprefixed variable (`NEMOTRON_TLS_CERT`, `NEMOTRON_TOKEN_FILE`, ...) after
its own. Tokens are read from a file or the environment, never from a flag: a command line is
visible to every user of the machine.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import Field, SecretStr, model_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from services.runtime.auth import read_tokens, split_tokens
from services.runtime.tls import check_server_files, is_loopback

#: Fields that fall back to `NEMOTRON_<FIELD>` when `NEMOTRON_<SERVICE>_<FIELD>` is not set.
SHARED_FIELDS = frozenset(
    {
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "token_file",
        "tokens",
        "open_health",
        "open_reflection",
        "insecure",
    }
)
#: Marks a field that has no flag (its value would be visible in the process list).
_ENV_ONLY: JsonDict = {"env_only": True}


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
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Also serve the health service alone, in plaintext and without tokens, on "
        "this port (0: not at all): for probes that cannot speak TLS, as Kubernetes' grpc "
        "probes cannot. It tells SERVING or NOT_SERVING, nothing else.",
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="Ask each client connection to go away after this many seconds (0: never); "
        "its open streams go on to their end, new ones open a new connection, so balanced "
        "clients re-resolve a DNS name and find replicas added since.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_content: bool = Field(
        False,
        description="Log transcripts, texts and prompts (off: only sizes and ids are logged).",
    )
    tls_cert: str = Field(
        "",
        description="PEM certificate chain of the server; with --tls-key turns TLS on. "
        "Re-read when the file changes (rotation without a restart).",
    )
    tls_key: str = Field("", description="PEM private key of --tls-cert.")
    tls_client_ca: str = Field(
        "",
        description="PEM CA(s) whose client certificates are accepted: mutual TLS; clients "
        "without such a certificate are refused at the handshake.",
    )
    token_file: str = Field(
        "",
        description="File of accepted bearer tokens, one per line (several for rotation); "
        "re-read when it changes. With tokens, every call needs 'authorization: Bearer ...'.",
    )
    tokens: SecretStr = Field(
        SecretStr(""),
        description="Accepted bearer tokens, comma-separated (environment only).",
        json_schema_extra=_ENV_ONLY,
    )
    open_health: bool = Field(
        True, description="Serve the health service without a token (for orchestrators' probes)."
    )
    open_reflection: bool = Field(False, description="Serve reflection without a token.")
    insecure: bool = Field(
        False,
        description="Allow a non-loopback --host without TLS and tokens (behind a trusted "
        "network boundary only).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then the server's own variables, then the shared NEMOTRON_* security ones."""
        shared = _SharedEnvSource(settings_cls, env_prefix="NEMOTRON_")
        return init_settings, env_settings, shared, dotenv_settings, file_secret_settings

    @property
    def uses_tls(self) -> bool:
        """Whether the server listens with TLS."""
        return bool(self.tls_cert)

    @property
    def uses_tokens(self) -> bool:
        """Whether calls need a bearer token."""
        return bool(self.token_file or split_tokens(self.tokens.get_secret_value()))

    @property
    def authenticates_clients(self) -> bool:
        """Whether every call is from a known client: TLS with tokens or client certificates."""
        return self.uses_tls and (self.uses_tokens or bool(self.tls_client_ca))

    @model_validator(mode="after")
    def _check_security(self) -> ServerSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together (--tls-cert with --tls-key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs TLS: give --tls-cert and --tls-key")
        if self.tls_cert:
            check_server_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.token_file:
            read_tokens(self.token_file)  # fails now, naming the file, rather than on a call
        if not is_loopback(self.host) and not self.authenticates_clients:
            if not self.insecure:
                raise ValueError(
                    f"host {self.host} is reachable from the network, so the server needs TLS "
                    "and tokens there (--tls-cert, --tls-key and --token-file, or the "
                    "NEMOTRON_TLS_CERT, NEMOTRON_TLS_KEY and NEMOTRON_TOKEN_FILE variables), or "
                    "mutual TLS (--tls-client-ca); "
                    "--insecure serves it without them, for a network you trust"
                )
        return self


Settings = TypeVar("Settings", bound=ServerSettings)


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[ServerSettings]) -> None:
    """Add one `--flag` per settings field, with its description and env variable as help."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        if _env_only(field):
            continue
        flag = "--" + name.replace("_", "-")
        env = f"{prefix}{name}".upper()
        if name in SHARED_FIELDS:
            env += f" or NEMOTRON_{name.upper()}"
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


class _SharedEnvSource(EnvSettingsSource):
    """`NEMOTRON_<FIELD>` for the shared security fields only; every other field is skipped."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The variable's value for a shared field; nothing for the others."""
        if field_name not in SHARED_FIELDS:
            return None, field_name, False
        return super().get_field_value(field, field_name)


def _env_only(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("env_only"))


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation

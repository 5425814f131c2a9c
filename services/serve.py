"""`nemotron-speech serve asr|tts|llm`: settings -> backend -> service -> server.

`python -m services.asr` (tts, llm) runs the same, without the CLI: services never import it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from services.asr.backends import ASR_BACKENDS
from services.asr.servicer import AsrService
from services.asr.settings import AsrSettings
from services.llm.backends import LLM_BACKENDS
from services.llm.servicer import LlmService
from services.llm.settings import LlmSettings
from services.runtime.logs import configure_logging
from services.runtime.registry import BackendEntry, BackendUnavailable, load_backend_class
from services.runtime.server import MeshServer
from services.runtime.service import MeshService
from services.runtime.settings import ServerSettings, add_settings_flags, settings_from_flags
from services.tts.backends import TTS_BACKENDS
from services.tts.servicer import TtsService
from services.tts.settings import TtsSettings

log = logging.getLogger(__name__)

EXIT_BAD_CONFIG = 2
EXIT_NO_BACKEND = 3
EXIT_LOAD_FAILED = 4


@dataclass(frozen=True)
class ServiceKind:
    """What `serve NAME` needs to know about one service."""

    settings: type[ServerSettings]
    service: Callable[[Any, Any], MeshService[Any, Any]]
    backends: dict[str, BackendEntry]
    summary: str


SERVICES: dict[str, ServiceKind] = {
    "asr": ServiceKind(AsrSettings, AsrService, ASR_BACKENDS, "streaming speech recognition"),
    "tts": ServiceKind(TtsSettings, TtsService, TTS_BACKENDS, "streaming speech synthesis"),
    "llm": ServiceKind(LlmSettings, LlmService, LLM_BACKENDS, "sentence-chunked LLM generation"),
}


def add_serve_parser(subparsers: Any) -> None:
    """Add `serve asr|tts|llm` with one flag per setting."""
    serve = subparsers.add_parser("serve", help="run one gRPC server")
    kinds = serve.add_subparsers(dest="service", required=True, metavar="{asr,tts,llm}")
    for name, kind in SERVICES.items():
        parser = kinds.add_parser(
            name, help=f"{kind.summary} server", description=_description(name)
        )
        _add_server_flags(parser, name)


def main(service: str, argv: Sequence[str] | None = None) -> int:
    """`python -m services.<service>`: the same flags and exit codes as `serve <service>`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{service}", description=_description(service)
    )
    _add_server_flags(parser, service)
    args = parser.parse_args(argv)
    args.service = service
    return run_serve(args)


def _description(name: str) -> str:
    return f"Run the {name.upper()} server ({SERVICES[name].summary})."


def _add_server_flags(parser: argparse.ArgumentParser, name: str) -> None:
    add_settings_flags(parser, SERVICES[name].settings)
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the settings and that the backend can be imported, then exit",
    )


def build_service(name: str, settings: ServerSettings) -> MeshService[Any, Any]:
    """The service `name` with the backend its settings choose (not loaded yet)."""
    kind = SERVICES[name]
    backend_cls = load_backend_class(kind.backends, settings.backend, name)
    return kind.service(settings, backend_cls.from_settings(settings))


def run_serve(args: argparse.Namespace) -> int:
    """Run the server chosen by `args.service` until SIGTERM/SIGINT; returns the exit code."""
    kind = SERVICES[args.service]
    try:
        settings = settings_from_flags(kind.settings, args)
    except ValidationError as err:
        print(f"invalid {args.service} settings:\n{err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    try:
        service = build_service(args.service, settings)
    except BackendUnavailable as err:
        print(f"nemotron-speech serve {args.service}: {err}", file=sys.stderr)
        return EXIT_NO_BACKEND
    if args.check_config:
        print(f"{args.service}: settings valid; backend {settings.backend} importable")
        return 0
    try:
        asyncio.run(MeshServer(service).run_until_signal())
    except OSError as err:
        print(f"nemotron-speech serve {args.service}: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Exception as err:  # the traceback was logged where the load failed
        print(f"nemotron-speech serve {args.service}: model failed to load: {err}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0

"""Backends chosen by name from settings, through one explicit registry per service.

Entries name their module lazily ("package.module:Class") so that choosing the CPU backend never
imports torch or NeMo, and a missing optional dependency becomes a clear message with the install
command instead of a traceback.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


class BackendUnavailable(Exception):
    """The chosen backend cannot be used on this installation; the message says what to do."""


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives and how to install what it needs."""

    target: str  # "package.module:ClassName"
    install_hint: str  # e.g. "pip install 'nemotron-speech-mesh[nemo]'"


def load_backend_class(registry: dict[str, BackendEntry], name: str, service: str) -> Any:
    """Import and return the backend class registered as `name`."""
    entry = registry.get(name)
    if entry is None:
        raise BackendUnavailable(
            f"unknown {service} backend {name!r}; choose one of: {', '.join(sorted(registry))}"
        )
    module_name, _, class_name = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendUnavailable(
            f"the {service} backend {name!r} cannot be loaded ({err}); install what it needs: "
            f"{entry.install_hint}"
        ) from err
    return getattr(module, class_name)

"""Matching BCP-47 language tags against what a backend supports."""

from __future__ import annotations

from collections.abc import Sequence

from services.runtime.errors import InvalidArgument


def resolve_language(requested: str, supported: Sequence[str], default: str, field: str) -> str:
    """The supported tag for `requested` ("" -> default; "en-US" matches "en"), or INVALID_ARGUMENT.

    Matching is case-insensitive and falls back from a region tag to its primary language.
    """
    if not requested:
        return default
    by_lower = {tag.lower(): tag for tag in supported}
    wanted = requested.replace("_", "-").lower()
    for candidate in (wanted, wanted.split("-")[0]):
        if candidate in by_lower:
            return by_lower[candidate]
    raise InvalidArgument(
        f"language {requested!r} is not supported; choose one of: {', '.join(supported)}",
        field=field,
    )

"""Server-assigned identifiers and limits on client-chosen ones."""

from __future__ import annotations

import uuid

from services.runtime.errors import InvalidArgument

MAX_CLIENT_ID_BYTES = 128


def new_id(prefix: str) -> str:
    """A short unique id such as `asr-3f2a9c1e4b7d`, readable in logs and traces."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def check_client_id(value: str, field: str) -> str:
    """Accept a client-chosen id of at most MAX_CLIENT_ID_BYTES bytes."""
    if len(value.encode()) > MAX_CLIENT_ID_BYTES:
        raise InvalidArgument(
            f"{field} is {len(value.encode())} bytes; at most {MAX_CLIENT_ID_BYTES} are allowed",
            field=field,
        )
    return value

"""The protocol errors every bidirectional call shares, worded once."""

from __future__ import annotations

from services.runtime.errors import FailedPrecondition, InvalidArgument


def first_request_required(expected: str, got: str | None, before: str) -> FailedPrecondition:
    """The call did not open with `expected` (config or start)."""
    return FailedPrecondition(
        f"the first request must be {expected}, got {got or 'an empty request'}; "
        f"send {expected} before {before}"
    )


def opening_request_repeated(name: str) -> FailedPrecondition:
    """`name` (config or start) arrived a second time."""
    return FailedPrecondition(f"{name} was already sent; send it once, as the first request")


def unknown_request(expected: str) -> InvalidArgument:
    """A request with no oneof field we know (an empty message, or a newer client)."""
    return InvalidArgument(
        f"request has no known field set (a newer client?); send {expected}", field="request"
    )

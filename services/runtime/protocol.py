"""The protocol errors every bidirectional call shares, worded once.

A message that sets none of the request oneof's fields (an empty message, or one whose only field
this server does not know) is malformed, so it is INVALID_ARGUMENT wherever it comes, the first
message included. A well-formed message that comes in the wrong order (audio before the config, a
second config) is FAILED_PRECONDITION.
"""

from __future__ import annotations

from services.runtime.errors import FailedPrecondition, InvalidArgument, ServiceError


def first_request_required(expected: str, got: str | None, before: str) -> ServiceError:
    """The call did not open with `expected` (config or start); `got` is what it opened with."""
    if got is None:
        return unknown_request(f"{expected} first")
    return FailedPrecondition(
        f"the first request must be {expected}, got {got}; send {expected} before {before}"
    )


def opening_request_repeated(name: str) -> FailedPrecondition:
    """`name` (config or start) arrived a second time."""
    return FailedPrecondition(f"{name} was already sent; send it once, as the first request")


def unknown_request(expected: str) -> InvalidArgument:
    """A request with no oneof field we know (an empty message, or a newer client)."""
    return InvalidArgument(
        f"request has no known field set (an empty message, or a newer client?); send {expected}",
        field="request",
    )

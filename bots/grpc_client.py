"""What the three adapters share on the client side of the mesh: channels, backoff, trace context.

Channels, retryable codes and backoff live in the `clients` package, which the CLI and the load
test use too; they are re-exported here so the adapters have one place to import from. Clients
retry only UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED, with jittered exponential
backoff; everything else is a bug in the request and is reported, not retried.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients.channel import MAX_MESSAGE_BYTES, open_channel
from clients.retry import RETRYABLE_CODES as RETRYABLE
from clients.retry import Backoff, describe, is_retryable
from services.runtime.telemetry import current_trace_context

__all__ = [
    "MAX_MESSAGE_BYTES",
    "RETRYABLE",
    "Backoff",
    "describe",
    "is_retryable",
    "open_channel",
    "refused_field",
    "trace_metadata",
]


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's W3C trace context as gRPC metadata (empty when tracing is off)."""
    return tuple(current_trace_context().items())


def refused_field(error: grpc.aio.AioRpcError) -> str:
    """The request field a `google.rpc.BadRequest` detail of `error` names ("" if none)."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status whose details disagree with its code: name nothing
        return ""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            refused = error_details_pb2.BadRequest()
            detail.Unpack(refused)
            return next((str(v.field) for v in refused.field_violations), "")
    return ""

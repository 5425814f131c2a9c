"""Domain errors and the one place that turns them into gRPC statuses.

Servicers and backends raise `ServiceError` subclasses; `rpc_errors` (a decorator for servicer
methods) aborts the call with the error's status code, its message and, for field errors, a
`google.rpc.BadRequest` detail naming the field. A request that grpc cannot decode (protobuf's
DecodeError, e.g. a string field that is not UTF-8) is the client's fault: INVALID_ARGUMENT.
Anything unexpected becomes INTERNAL with a generic message and a logged traceback, so no internals
leak to clients.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# Codes a client may retry with backoff: the clients' own list, so both sides agree.
from clients.retry import RETRYABLE_CODES

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error a client can act on, carried to it as a gRPC status.

    Attributes:
        code: The gRPC status code.
        message: A sentence a person can act on.
        field: The request field at fault, if any (sent as a BadRequest field violation).
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def retryable(self) -> bool:
        """Whether a client may retry the same call after a backoff."""
        return self.code in RETRYABLE_CODES

    def to_status(self) -> grpc.Status:
        """The rich status (code, message, details) for `context.abort_with_status`."""
        status = status_pb2.Status(code=_google_code(self.code), message=self.message)
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.message
            )
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            status.details.append(detail)
        rich = rpc_status.to_status(status)
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not isinstance(self, AtCapacity):
            # gRFC A6 pushback: the clients' retry policy must not replay this on another
            # replica (a full context window or a rate limit is no better there).
            metadata = (*rich.trailing_metadata, ("grpc-retry-pushback-ms", "-1"))
            return rich._replace(trailing_metadata=metadata)
        return rich


class InvalidArgument(ServiceError):
    """A request field has a value the server cannot accept."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    """The request is valid but not in the stream's current state (e.g. audio before config)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """A limit was reached (streams, queue depth, utterance length); retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AtCapacity(ResourceExhausted):
    """This replica holds as many streams as it may; another replica may have room.

    The one RESOURCE_EXHAUSTED that clients' retry policy tries again on the next replica
    (`clients.channel`); every other one carries pushback that stops the retry.
    """


class Unavailable(ServiceError):
    """The model or an upstream server is not ready or cannot be reached; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    """The call carries no accepted credentials (a missing or refused bearer token).

    The message says what is missing; it never repeats the credentials the client sent.
    """

    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(ServiceError):
    """A bounded wait ran out."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    """A server fault; the message stays generic."""

    code = grpc.StatusCode.INTERNAL


def _google_code(code: grpc.StatusCode) -> int:
    value = code.value[0]
    assert isinstance(value, int)
    return value


#: Codes that say the server failed, not the request: logged where an operator looks.
_SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)
_GENERIC_INTERNAL = "internal error; the server logged the details"
_UNDECODABLE = (
    "a request message could not be decoded: it is not valid protobuf for this method, or a "
    "string field is not valid UTF-8 (proto3 strings must be UTF-8)"
)

Method = TypeVar("Method", bound=Callable[..., AsyncIterator[Any]])


async def abort_for(context: grpc.aio.ServicerContext, err: Exception, where: str) -> None:
    """End the call for `err`: its own status for a ServiceError, a generic INTERNAL otherwise."""
    if isinstance(err, DecodeError):
        # Raised by grpc.aio while it deserializes a request of the stream: the client's fault.
        err = InvalidArgument(_UNDECODABLE)
    if isinstance(err, ServiceError):
        # The client's mistakes and the server's limits are routine; its own faults are not.
        level = logging.WARNING if err.code in _SERVER_FAULTS else logging.INFO
        log.log(level, "rpc ended with %s: %s", err.code.name, err.message)
        await context.abort_with_status(err.to_status())
    log.error("unexpected error in %s", where, exc_info=err)
    await context.abort(grpc.StatusCode.INTERNAL, _GENERIC_INTERNAL)


def rpc_errors(method: Method) -> Method:
    """Wrap a streaming servicer method so that errors end the call with the right status.

    `ServiceError` aborts with its own status. `asyncio.CancelledError` (client gone, server
    stopping) propagates untouched, as does an abort already under way. Any other exception is
    logged with its traceback and becomes INTERNAL. When the call ends early (the client went
    away while the method waited at a `yield`), closing the wrapper closes the method too, so
    its `finally` runs then rather than whenever the garbage collector gets to it.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        responses = method(self, request, context)
        try:
            async for response in responses:
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await abort_for(context, err, method.__qualname__)
        finally:
            if isinstance(responses, AsyncGenerator):
                await responses.aclose()

    return wrapper  # type: ignore[return-value]


def unary_rpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """The unary counterpart of `rpc_errors`."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await abort_for(context, err, method.__qualname__)

    return wrapper


__all__ = [
    "RETRYABLE_CODES",
    "AtCapacity",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "abort_for",
    "rpc_errors",
    "unary_rpc_errors",
]

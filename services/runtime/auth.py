"""Bearer-token authentication: a server interceptor that refuses calls without a known token.

A client sends `authorization: Bearer <token>` in its call metadata (clients.security does it as
gRPC call credentials, which only travel over TLS or to this machine). The server accepts any of
several tokens, so that a new one can be handed out before the old one is withdrawn:

- from `token_file`, one per line (blank lines and # comments skipped), re-read when the file
  changes, so a rotation needs no restart;
- from the `tokens` setting (`NEMOTRON_<SERVICE>_TOKENS` or `NEMOTRON_TOKENS`), comma-separated.

A token is compared with `hmac.compare_digest` over SHA-256 digests, against every accepted token
without stopping at the first match, so neither the time a refusal takes nor its length says how
close a guess was. A refused call ends with UNAUTHENTICATED and is logged with its method, peer
and reason; no token, right or wrong, is ever logged, put in an error message or a span.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.runtime.errors import Unauthenticated

log = logging.getLogger(__name__)

#: Methods under these prefixes are the health service and reflection (v1 and v1alpha).
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)

NO_TOKEN = "this server needs a bearer token: send the metadata 'authorization: Bearer TOKEN'"
WRONG_TOKEN = "the bearer token was not accepted"
BAD_HEADER = "the authorization metadata is not 'Bearer TOKEN'"


def split_tokens(value: str) -> list[str]:
    """The tokens of a comma-separated value, without blanks."""
    return [token.strip() for token in value.split(",") if token.strip()]


def read_tokens(path: str) -> list[str]:
    """The tokens in `path`, one per line.

    Raises:
        ValueError: the file cannot be read or holds no token (the message names the path, never
            a line of the file).
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"token_file {path}: {err.strerror or err}") from None
    tokens = [token for line in lines if (token := line.strip()) and not token.startswith("#")]
    if not tokens:
        raise ValueError(f"token_file {path}: no token in the file")
    return tokens


class AcceptedTokens:
    """The tokens a server accepts: from the environment, and from a file re-read on change.

    Args:
        token_file: File of tokens, one per line ("" for none).
        tokens: Tokens given directly (from the environment).
    """

    def __init__(self, token_file: str = "", tokens: Iterable[str] = ()) -> None:
        self.token_file = token_file
        self._fixed = [_digest(token) for token in tokens]
        self._from_file: list[bytes] = []
        self._stamp: tuple[int, int, int] | None = None
        self._refresh()
        if not self._fixed and not self._from_file:
            raise ValueError("token authentication needs at least one token")

    def accepts(self, token: str) -> bool:
        """Whether `token` is one of the accepted ones (in time independent of which, if any)."""
        self._refresh()
        given = _digest(token)
        accepted = False
        for known in (*self._fixed, *self._from_file):
            accepted |= hmac.compare_digest(given, known)
        return accepted

    def _refresh(self) -> None:
        if not self.token_file:
            return
        try:
            stat = os.stat(self.token_file)
        except OSError as err:
            if self._stamp is not None:  # log once when it goes away, not on every call
                log.warning("token_file not readable (%s); keeping its last tokens", err.strerror)
                self._stamp = None
            return
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            tokens = read_tokens(self.token_file)
        except ValueError as err:
            log.warning("%s; keeping its last tokens", err)
            return
        if self._from_file:
            log.info("token_file %s reloaded: %d token(s)", self.token_file, len(tokens))
        self._from_file = [_digest(token) for token in tokens]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses, with UNAUTHENTICATED, every call without an accepted bearer token.

    Args:
        tokens: The accepted tokens.
        open_prefixes: Method name prefixes served without a token (health, reflection).
    """

    def __init__(self, tokens: AcceptedTokens, open_prefixes: Sequence[str] = ()) -> None:
        self.tokens = tokens
        self.open_prefixes = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's own handler for an accepted call, else one that refuses it."""
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        reason = self._refusal(handler_call_details.invocation_metadata or ())
        if reason is None:
            return handler
        return _refusing(handler, method, reason)

    def _refusal(self, metadata: Iterable[Any]) -> str | None:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return NO_TOKEN
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return BAD_HEADER
        return None if self.tokens.accepts(token.strip()) else WRONG_TOKEN


def _refusing(handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that logs the attempt and aborts the call."""
    error = Unauthenticated(reason)

    async def refuse(context: grpc.aio.ServicerContext) -> None:
        log.warning("refused %s from %s: %s", method, context.peer(), reason)
        await context.abort_with_status(error.to_status())

    async def unary(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)

    async def streaming(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(context)
        yield  # pragma: no cover - never reached: abort raises

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary, **serializers)


def auth_interceptors(
    token_file: str, tokens: str, open_health: bool, open_reflection: bool
) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors for these settings: none when no token is configured."""
    fixed = split_tokens(tokens)
    if not token_file and not fixed:
        return []
    open_prefixes = [
        *([HEALTH_PREFIX] if open_health else []),
        *(REFLECTION_PREFIXES if open_reflection else []),
    ]
    return [TokenAuthInterceptor(AcceptedTokens(token_file, fixed), open_prefixes)]

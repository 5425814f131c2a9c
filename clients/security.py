"""How a client reaches a secured server: TLS, mutual TLS and a bearer token.

Every client (the bot adapters, the CLI, the load test) gets its settings from flags
(`add_security_flags`) or from these environment variables; with none set it speaks plaintext
without a token, as the servers do by default:

    NEMOTRON_TLS_CA            PEM of the CA that signed the servers' certificates (turns TLS on)
    NEMOTRON_TLS               "true": TLS with the system's root CAs, for a public certificate
    NEMOTRON_TLS_CLIENT_CERT   this client's certificate chain, for servers that want mutual TLS
    NEMOTRON_TLS_CLIENT_KEY    its private key
    NEMOTRON_TLS_SERVER_NAME   the name to check the server's certificate against, when the
                               target's host is not in it
    NEMOTRON_TOKEN             the bearer token, sent as `authorization: Bearer ...`
    NEMOTRON_TOKEN_FILE        a file whose first line is the token (read when a channel opens,
                               so a rotated token reaches the next session without a restart)

A token travels as gRPC call credentials. gRPC sends those only over a secure channel, which is
what we want: with TLS they ride in it; without TLS they go over gRPC's local credentials, which
check that the peer is on this machine and refuse anything else. So a token never crosses a
network in plaintext, however the client is configured.

A plaintext client that meets a TLS server only hears "Socket closed" from gRPC; `diagnose` finds
out why (it tries a TLS handshake of its own) and says what to set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

_TRUE = ("1", "true", "yes", "on")


class ClientSecurityError(ValueError):
    """A client security setting names a file that is missing, unreadable or empty."""


@dataclass(frozen=True)
class ClientSecurity:
    """What a client presents to, and expects of, the servers it dials.

    Attributes:
        tls: Use TLS (implied by `ca`; alone, the system's root CAs verify the server).
        ca: The CA that signed the servers' certificates.
        cert: This client's certificate chain, for mutual TLS.
        key: The private key of `cert`.
        server_name: The name the server's certificate must carry, instead of the target's host.
        token: The bearer token; empty sends none. Never printed (not in the repr).
    """

    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ClientSecurityError(
                "a client certificate needs its key and the other way round "
                "(--tls-client-cert with --tls-client-key, or NEMOTRON_TLS_CLIENT_CERT with "
                "NEMOTRON_TLS_CLIENT_KEY)"
            )
        if self.cert is not None and not self.uses_tls:
            raise ClientSecurityError(
                "a client certificate is only sent over TLS: give the servers' CA too "
                "(--tls-ca or NEMOTRON_TLS_CA)"
            )

    @property
    def uses_tls(self) -> bool:
        """Whether channels are TLS (else plaintext, with any token over local credentials)."""
        return self.tls or self.ca is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClientSecurity:
        """The settings the NEMOTRON_TLS_* and NEMOTRON_TOKEN* variables give."""
        token = env.get("NEMOTRON_TOKEN", "").strip()
        if not token and (token_file := env.get("NEMOTRON_TOKEN_FILE")):
            token = read_token_file(Path(token_file), "NEMOTRON_TOKEN_FILE")
        return cls(
            tls=env.get("NEMOTRON_TLS", "").lower() in _TRUE,
            ca=_path(env.get("NEMOTRON_TLS_CA")),
            cert=_path(env.get("NEMOTRON_TLS_CLIENT_CERT")),
            key=_path(env.get("NEMOTRON_TLS_CLIENT_KEY")),
            server_name=env.get("NEMOTRON_TLS_SERVER_NAME", ""),
            token=token,
        )

    def describe(self) -> str:
        """A few words for logs: what this client uses (never the token itself)."""
        parts = ["TLS" if self.uses_tls else "plaintext"]
        if self.cert is not None:
            parts.append("client certificate")
        if self.token:
            parts.append("token")
        return ", ".join(parts)


def read_token_file(path: Path, source: str) -> str:
    """The first token in `path`: its first line that is neither blank nor a # comment.

    Raises:
        ClientSecurityError: the file cannot be read or holds no token; the message names
            `source` (the flag or variable) and the path, never the file's content.
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ClientSecurityError(f"{source} {path}: {err.strerror or err}") from None
    for line in lines:
        token = line.strip()
        if token and not token.startswith("#"):
            return token
    raise ClientSecurityError(f"{source} {path}: no token in the file")


def channel_credentials(security: ClientSecurity) -> grpc.ChannelCredentials | None:
    """The credentials of a channel with `security`; None for a plain insecure channel.

    Raises:
        ClientSecurityError: a certificate or key file cannot be read.
    """
    credentials: grpc.ChannelCredentials
    if security.uses_tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(security.ca, "--tls-ca"),
            private_key=_read(security.key, "--tls-client-key"),
            certificate_chain=_read(security.cert, "--tls-client-cert"),
        )
    elif security.token:
        # Call credentials need a secure channel; local credentials are one only towards this
        # machine (gRPC checks the peer address), so a token without TLS never leaves it.
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None
    if security.token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(security.token)
        )
    return credentials


def channel_options(security: ClientSecurity) -> list[tuple[str, str | int]]:
    """Channel options that `security` needs (the server name to verify, when overridden)."""
    if security.uses_tls and security.server_name:
        return [("grpc.ssl_target_name_override", security.server_name)]
    return []


# ---- flags --------------------------------------------------------------------------------------


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """The client's security flags; each defaults to its environment variable."""
    group = parser.add_argument_group(
        "security", "TLS and token for reaching secured servers (default: NEMOTRON_TLS_* env)"
    )
    group.add_argument("--tls", action="store_true", help="TLS, verified by the system's root CAs")
    group.add_argument("--tls-ca", type=Path, help="CA of the servers' certificates; turns TLS on")
    group.add_argument(
        "--tls-client-cert", type=Path, help="this client's certificate, for mutual TLS"
    )
    group.add_argument("--tls-client-key", type=Path, help="the key of --tls-client-cert")
    group.add_argument(
        "--tls-server-name", help="name to verify in the servers' certificates, if not the host"
    )
    group.add_argument(
        "--token-file",
        type=Path,
        help="file whose first line is the bearer token (never a flag value: argv is public)",
    )


def security_from_args(
    args: argparse.Namespace, env: Mapping[str, str] = os.environ
) -> ClientSecurity:
    """The environment's settings, with the flags `add_security_flags` added laid over them."""
    base = ClientSecurity.from_env(env)
    token = base.token
    if args.token_file is not None:
        token = read_token_file(args.token_file, "--token-file")
    return ClientSecurity(
        tls=args.tls or base.tls,
        ca=args.tls_ca or base.ca,
        cert=args.tls_client_cert or base.cert,
        key=args.tls_client_key or base.key,
        server_name=args.tls_server_name or base.server_name,
        token=token,
    )


# ---- why a call could not connect ---------------------------------------------------------------


async def diagnose(
    error: BaseException, target: str, security: ClientSecurity, timeout_s: float = 1.0
) -> str:
    """Why `error` happened, when it is a security mismatch; "" when it is not one.

    gRPC reports a plaintext client refused by a TLS server as UNAVAILABLE "Socket closed", the
    same as a server that vanished. Here, after such an error on a plaintext channel, the client
    tries a TLS handshake of its own: a server that answers it speaks TLS, and the client must
    too. For a TLS client whose connection the server closed, the likely cause is mutual TLS.
    """
    if not isinstance(error, grpc.aio.AioRpcError):
        return ""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNAVAILABLE and "health check call failed" in details:
        # A balanced channel (clients.channel) checks each replica's health before it sends a
        # call there; a server whose health needs a token (--no-open-health) refuses the check
        # of a client that has none.
        if not security.token:
            return (
                f"the server at {target} refused this client's health checks: it needs a token "
                "even for health (--no-open-health); give the client one (--token-file or "
                "NEMOTRON_TOKEN_FILE)"
            )
        return f"the server at {target} refused this client's health checks"
    # Only a connection that closed while it was being set up: a call that breaks later (the
    # server stopped) says "Socket closed" too, but is no mismatch. A plain channel says "failed
    # to connect", a balanced one "connections to all backends failing".
    connecting = any(
        words in details for words in ("failed to connect", "connections to all backends failing")
    )
    if error.code() != grpc.StatusCode.UNAVAILABLE or not connecting:
        return ""
    if "Socket closed" not in details:
        return ""
    if not security.uses_tls:
        return await tls_mismatch(target, security, timeout_s)
    if security.cert is None:
        return (
            f"the server at {target} closed the TLS connection: if it requires mutual TLS, "
            "give this client a certificate its CA signed (--tls-client-cert/--tls-client-key "
            "or NEMOTRON_TLS_CLIENT_CERT/NEMOTRON_TLS_CLIENT_KEY)"
        )
    return (
        f"the server at {target} closed the TLS connection: it may not trust this client's "
        "certificate (signed by a CA other than its --tls-client-ca)"
    )


async def tls_mismatch(target: str, security: ClientSecurity, timeout_s: float = 1.0) -> str:
    """A sentence when this client is plaintext and the server at `target` speaks TLS; else ""."""
    if security.uses_tls or not await speaks_tls(target, timeout_s):
        return ""
    return (
        f"the server at {target} speaks TLS and this client plaintext: give the client the CA "
        "of the server's certificate (--tls-ca or NEMOTRON_TLS_CA)"
    )


async def speaks_tls(target: str, timeout_s: float = 1.0) -> bool:
    """Whether the server at `target` (host:port) answers a TLS handshake.

    The handshake checks nothing (it only asks whether the server speaks TLS at all): a server
    that completes it, or refuses it with a TLS alert, speaks TLS; one that closes the connection
    or answers with something else does not.
    """
    address = _host_port(target)
    if address is None:
        return False
    host, port = address
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        async with asyncio.timeout(timeout_s):
            _reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except ssl.SSLError as err:
        return "ALERT" in (err.reason or "")
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


def _host_port(target: str) -> tuple[str, int] | None:
    address = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    address = address.split(",", 1)[0]  # of several replicas, the first stands for them all
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise ClientSecurityError(f"{flag} {path}: {err.strerror or err}") from None

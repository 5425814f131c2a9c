"""The channel every client opens to a server of the mesh: one server or several replicas.

A target may name several replicas: a `dns:///name:port` that resolves to several addresses (a
Kubernetes headless Service), or a list (`ipv4:10.0.0.2:8080,10.0.0.3:8080`). gRPC itself
balances them: the service config below asks for `round_robin` over the replicas whose standard
health service reports SERVING (client-side health checking: a replica that loads its model or
drains is skipped), and retries a stream start that a replica refused before it answered
anything: UNAVAILABLE (it went away) and RESOURCE_EXHAUSTED (it is at its `--max-streams`),
each retry on the next replica in the round. A stream that already had an answer is never
retried by gRPC: the adapters' own backoff re-opens it, on whichever replica is picked next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from clients.security import ClientSecurity, channel_credentials, channel_options

#: The servers' default message bound; audio chunks are far smaller.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

#: How often a channel pings its server, idle or not; the servers allow pings this frequent.
KEEPALIVE_TIME_MS = 10_000

#: Tries of one stream start, the first included (gRPC caps this at 5): with three replicas at
#: their limit, a start is refused three times before the caller sees RESOURCE_EXHAUSTED.
START_ATTEMPTS = 4

#: The service config of a balanced channel (gRFC A6 retries, A17 client-side health checks).
#: The health service name "" is the whole server, which every server of the mesh reports.
SERVICE_CONFIG: dict[str, object] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [
        {
            "name": [{}],  # every method of every service
            "retryPolicy": {
                "maxAttempts": START_ATTEMPTS,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }
    ],
}

_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

_BALANCED: list[tuple[str, str | int]] = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    # The channel's own config wins over one a DNS TXT record might carry.
    ("grpc.service_config_disable_resolution", 1),
    ("grpc.enable_retries", 1),
]


def open_channel(
    target: str,
    security: ClientSecurity | None = None,
    options: Sequence[tuple[str, str | int]] = (),
    balanced: bool = True,
) -> grpc.aio.Channel:
    """A channel to `target` with bounded messages, secured as `security` says.

    Keepalive pings let a client notice a server that vanished without closing its sockets; the
    channel's own reconnect backoff is capped at 5 s (gRPC's default grows to 120 s), so a server
    back from a long outage is found as soon as our own `Backoff` asks again.

    Args:
        target: The server or its replicas: "127.0.0.1:8080", "dns:///asr.mesh.svc:8080",
            "ipv4:127.0.0.2:8080,127.0.0.3:8080".
        security: TLS and token; None reads them from the environment now
            (`ClientSecurity.from_env`), so a rotated token file is read by each new channel.
        options: More channel options, which override the defaults of the same name.
        balanced: Round robin over the healthy replicas with retried starts (`SERVICE_CONFIG`).
            False is a plain channel to the first address that connects, with no health check
            of its own: for callers that ask the health service themselves (readiness waits,
            `health`), which must reach a server that is not SERVING.

    Raises:
        ClientSecurityError: a certificate, key or token file cannot be read.
    """
    security = ClientSecurity.from_env() if security is None else security
    balancing = _BALANCED if balanced else []
    merged = dict([*_OPTIONS, *balancing, *channel_options(security), *options])
    credentials = channel_credentials(security)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(merged.items()))
    return grpc.aio.secure_channel(target, credentials, options=list(merged.items()))

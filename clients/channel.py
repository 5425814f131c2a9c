"""The channel every long-lived client opens to a server of the mesh."""

from __future__ import annotations

import grpc

#: The servers' default message bound; audio chunks are far smaller.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel to a loopback or private-network target, with bounded messages.

    Keepalive pings let a client notice a server that vanished without closing its sockets; the
    channel's own reconnect backoff is capped at 5 s (gRPC's default grows to 120 s), so a server
    back from a long outage is found as soon as our own `Backoff` asks again.
    """
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ],
    )

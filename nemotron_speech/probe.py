"""Asks running servers how they are: gRPC health plus ServerInfoService, with a deadline."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import open_channel
from clients.security import ClientSecurity, diagnose
from nemotron.speech.v1 import info_pb2, info_pb2_grpc


@dataclass(frozen=True)
class ServerStatus:
    """One server as seen from a client."""

    name: str
    target: str
    health: str  # SERVING, NOT_SERVING, ... or DOWN when unreachable
    backend: str = ""
    model: str = ""
    active_streams: int = 0
    max_streams: int = 0
    error: str = ""

    @property
    def serving(self) -> bool:
        """True when the server reports SERVING."""
        return self.health == "SERVING"


async def probe(
    name: str, target: str, timeout_s: float = 2.0, security: ClientSecurity | None = None
) -> ServerStatus:
    """Health and info of the server at `target`; DOWN with the reason if it cannot be asked.

    `security` is the channel's TLS and token (None: from the environment).
    """
    security = ClientSecurity.from_env() if security is None else security
    # Unbalanced: a balanced channel would hide a server that is not SERVING, whose state this
    # reports.
    async with open_channel(target, security, balanced=False) as channel:
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as err:
            reason = await diagnose(err, target, security)
            error = f"{err.code().name}: {reason}" if reason else err.code().name
            return ServerStatus(name, target, "DOWN", error=error)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
        try:
            info = await info_pb2_grpc.ServerInfoServiceStub(channel).GetServerInfo(
                info_pb2.GetServerInfoRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as err:
            return ServerStatus(name, target, status, error=f"no server info: {err.code().name}")
        return ServerStatus(
            name, target, status, info.backend, info.model, info.active_streams, info.max_streams
        )


async def probe_all(
    targets: dict[str, str], timeout_s: float = 2.0, security: ClientSecurity | None = None
) -> list[ServerStatus]:
    """Probe several servers at once."""
    security = ClientSecurity.from_env() if security is None else security
    return list(
        await asyncio.gather(*(probe(name, t, timeout_s, security) for name, t in targets.items()))
    )


def format_table(statuses: list[ServerStatus]) -> str:
    """A fixed-width table for the terminal."""
    rows = [("SERVICE", "TARGET", "HEALTH", "BACKEND", "MODEL", "STREAMS")]
    for s in statuses:
        streams = f"{s.active_streams}/{s.max_streams}" if s.max_streams else "-"
        rows.append(
            (s.name, s.target, s.health, s.backend or "-", s.model or s.error or "-", streams)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )

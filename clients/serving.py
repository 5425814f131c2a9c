"""Start a server on this machine and wait until its standard gRPC health service says SERVING.

The servers listen at once with health NOT_SERVING and turn SERVING when their model has loaded,
so "the port answers" is not "ready": a client that needs the model waits on health.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import open_channel
from clients.retry import Backoff, describe
from clients.security import ClientSecurity, diagnose, tls_mismatch

SERVING = health_pb2.HealthCheckResponse.SERVING

# While the server is not listening yet, the channel retries the connection this often at most
# (gRPC's default backoff grows to 120 s, far longer than a model takes to load).
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


async def wait_serving(
    target: str,
    timeout_s: float = 180.0,
    service: str = "",
    security: ClientSecurity | None = None,
) -> None:
    """Return once the server at `target` reports SERVING for `service` ("" is the whole server).

    Watches the health service rather than polling it: the server pushes each change of status,
    and the call waits for the connection while the server is not listening yet. A call that
    fails (the server restarting, or one without health) is made again after a backoff.
    `security` is the channel's TLS and token (None: from the environment).

    Raises:
        TimeoutError: not SERVING within `timeout_s` seconds; the message says why when a
            call failed on the way (a refused token, a TLS mismatch).
    """
    security = ClientSecurity.from_env() if security is None else security
    failures: list[grpc.aio.AioRpcError] = []
    try:
        async with asyncio.timeout(timeout_s):
            await _watch_until_serving(target, service, security, failures)
    except TimeoutError:
        if failures:
            reason = await diagnose(failures[-1], target, security) or describe(failures[-1])
        else:  # the call waited for a connection that never came: perhaps TLS meets plaintext
            reason = await tls_mismatch(target, security)
        raise TimeoutError(
            f"the server at {target} did not become ready in {timeout_s:g} s"
            + (f"; last error: {reason}" if reason else "")
        ) from None


async def _watch_until_serving(
    target: str,
    service: str,
    security: ClientSecurity,
    failures: list[grpc.aio.AioRpcError],
) -> None:
    backoff = Backoff(first_s=0.1, ceiling_s=1.0)
    # Unbalanced: this is a health check itself, so the channel must reach a server that is not
    # SERVING yet (a balanced channel hides it); with several replicas, the first one answers.
    async with open_channel(target, security, _RECONNECT_OPTIONS, balanced=False) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        while True:
            try:
                # wait_for_ready: the call waits for the connection instead of failing at once.
                async for reply in health.Watch(request, wait_for_ready=True):
                    if reply.status == SERVING:
                        return
            except grpc.aio.AioRpcError as error:
                failures[:] = [error]
            await asyncio.sleep(backoff.next_delay())


async def start_server(
    module: str, extra: Sequence[str] = ()
) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m module` on a free loopback port, sized and quiet for a benchmark.

    Returns the process and its target; it is not ready yet (`wait_serving`). The flags give it
    room for 64 streams and log warnings only; `extra` adds to them or overrides them.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", module, "--port", str(port), "--max-streams", "64"]
    command += ["--log-level", "WARNING", *extra]
    return await asyncio.create_subprocess_exec(*command), f"127.0.0.1:{port}"

"""The gRPC server every service runs in: health, reflection, limits and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.runtime.info import SERVICE_NAME as INFO_SERVICE
from services.runtime.info import ServerInfoServicer
from services.runtime.reflection import enable_reflection
from services.runtime.service import MeshService
from services.runtime.telemetry import configure_telemetry, flush_telemetry

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class MeshServer:
    """Hosts one `MeshService` on a grpc.aio server.

    `start()` binds and starts listening at once, with health NOT_SERVING; the model loads in the
    background and health turns SERVING when it is ready, so orchestrators can tell "starting" from
    "dead". `stop()` reports NOT_SERVING, lets open streams finish within the grace period, then
    cancels them.
    """

    def __init__(self, service: MeshService[Any, Any]) -> None:
        self.service = service
        self.settings = service.settings
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._load_task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen, then load the model in the background; returns the bound port."""
        # Before the server exists: the gRPC instrumentation hooks server creation.
        self.service.telemetry = configure_telemetry(self.service.telemetry_name)
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                # Detect dead peers on long-lived voice streams without waiting for TCP timeouts.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        self.service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        ServerInfoServicer(self.service).register(server)
        enable_reflection([self.service.service_name, INFO_SERVICE, health.SERVICE_NAME], server)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"cannot bind {address}: {err}") from err
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        log.info("%s listening on %s:%d", self.service.service_name, self.settings.host, self.port)
        self._load_task = asyncio.create_task(self._load(), name="load-model")
        return self.port

    async def wait_loaded(self) -> None:
        """Wait until the model is loaded; raises what loading raised."""
        assert self._load_task is not None, "start() first"
        await asyncio.shield(self._load_task)

    async def stop(self) -> None:
        """Report NOT_SERVING, drain streams for the grace period, then release the model."""
        if self._server is None:
            return
        server, self._server = self._server, None
        await self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_s
        log.info("shutting down; open streams get %.1f s to finish", grace)
        await server.stop(grace)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            await asyncio.wait({self._load_task})
        self.service.ready = False
        await self.service.aclose()
        flush_telemetry()
        log.info("stopped")

    async def run_until_signal(self) -> None:
        """Start, serve until SIGTERM or SIGINT (or a failed model load), then stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        assert self._load_task is not None
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({stopper, self._load_task}, return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set() and self._load_task.exception() is None:
                await stop.wait()
        finally:
            stopper.cancel()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self._load_task.done() and not self._load_task.cancelled():
            failure = self._load_task.exception()
            if failure is not None:
                raise failure

    async def _load(self) -> None:
        started = loop_time()
        try:
            await self.service.load()
        except Exception:
            log.exception("model failed to load; the server will stop")
            raise
        self.service.ready = True
        await self._set_health(SERVING)
        log.info("ready in %.2f s; health SERVING", loop_time() - started)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", self.service.service_name):
            await self.health.set(name, status)


def loop_time() -> float:
    """Seconds on the running loop's monotonic clock."""
    return asyncio.get_running_loop().time()

"""The gRPC server every service runs in: health, reflection, security, limits and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.runtime.auth import auth_interceptors
from services.runtime.info import SERVICE_NAME as INFO_SERVICE
from services.runtime.info import ServerInfoServicer
from services.runtime.reflection import enable_reflection
from services.runtime.service import MeshService
from services.runtime.telemetry import configure_telemetry, flush_telemetry, observe_streams
from services.runtime.tls import CertificateFiles, is_loopback

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: The shortest interval between a client's pings that the server tolerates; clients ping less
#: often than this (`clients.channel`), so that gRPC never sees their keepalive as abuse.
MIN_CLIENT_PING_INTERVAL_MS = 5_000


class MeshServer:
    """Hosts one `MeshService` on a grpc.aio server.

    `start()` binds and starts listening at once, with health NOT_SERVING; the model loads in the
    background and health turns SERVING when it is ready, so orchestrators can tell "starting" from
    "dead". `stop()` reports NOT_SERVING, lets open streams finish within the grace period, then
    cancels them.

    Health is what balances replicas: clients' channels (`clients.channel`) send new streams
    only to replicas whose health says SERVING, so a replica that loads or drains gets none. A
    replica at its `--max-streams` stays SERVING and refuses the stream with RESOURCE_EXHAUSTED
    before any answer, which the clients' retry policy tries on the next replica.
    """

    def __init__(self, service: MeshService[Any, Any]) -> None:
        self.service = service
        self.settings = service.settings
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        #: The plaintext health-only server of `health_port`, when there is one.
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        self._unobserve: Callable[[], None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        #: The TLS files served, while TLS is on (their `reloads` count rotations).
        self.certificates: CertificateFiles | None = None

    async def start(self) -> int:
        """Listen, then load the model in the background; returns the bound port."""
        # Before the server exists: the gRPC instrumentation hooks server creation.
        self.service.telemetry = configure_telemetry(self.service.telemetry_name)
        limit = self.settings.max_message_bytes
        settings = self.settings
        interceptors = auth_interceptors(
            settings.token_file,
            settings.tokens.get_secret_value(),
            settings.open_health,
            settings.open_reflection,
        )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                # Detect dead peers on long-lived voice streams without waiting for TCP timeouts.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                # Our clients ping every 10 s, idle or not, to notice a vanished server; a
                # server that counted those pings as abuse would answer GOAWAY too_many_pings
                # and drop an idle bot's channel.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
                *_connection_age_options(settings.max_connection_age_s),
            ],
        )
        self.service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        ServerInfoServicer(self.service).register(server)
        enable_reflection([*self.service.service_names, INFO_SERVICE, health.SERVICE_NAME], server)
        address = f"{settings.host}:{settings.port}"
        try:
            if settings.tls_cert:
                self.certificates = CertificateFiles(
                    settings.tls_cert, settings.tls_key, settings.tls_client_ca
                )
                self.port = server.add_secure_port(address, self.certificates.credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"cannot bind {address}: {err}") from err
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        if settings.health_port:
            try:
                self._health_server = await self._serve_health(settings.host, settings.health_port)
            except OSError:
                await server.stop(0)  # nothing may stay bound when the start fails
                self._server = None
                raise
        limiter = self.service.limiter
        name = self.service.service_name
        self._unobserve = observe_streams(lambda: (name, limiter.active, limiter.capacity))
        security = _describe_security(
            settings.uses_tls, bool(settings.tls_client_ca), bool(interceptors)
        )
        log.info(
            "%s listening on %s:%d (%s)",
            self.service.service_name,
            settings.host,
            self.port,
            security,
        )
        if not is_loopback(settings.host) and not settings.authenticates_clients:
            log.warning(
                "serving %s without TLS and client authentication on %s (--insecure): anyone "
                "who reaches the port can use it",
                self.service.service_name,
                settings.host,
            )
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
        if self._health_server is not None:  # it said NOT_SERVING all along the drain
            await self._health_server.stop(0)
            self._health_server = None
        if self._unobserve is not None:
            self._unobserve()
            self._unobserve = None
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

    async def _serve_health(self, host: str, port: int) -> grpc.aio.Server:
        """The same health service alone, plaintext, on `port`: what Kubernetes probes dial."""
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{host}:{port}"
        try:
            self.health_port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"cannot bind the health port {address}: {err}") from err
        await server.start()
        log.info("health alone (plaintext) on %s:%d", host, self.health_port)
        return server

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", *self.service.service_names):
            await self.health.set(name, status)


def _connection_age_options(age_s: float) -> list[tuple[str, int]]:
    """GOAWAY each connection after `age_s` (0: never); its open streams run to their end."""
    if not age_s:
        return []
    return [("grpc.max_connection_age_ms", round(age_s * 1000))]


def _describe_security(tls: bool, mutual: bool, tokens: bool) -> str:
    words = ["mutual TLS" if mutual else "TLS" if tls else "plaintext"]
    words.append("tokens" if tokens else "no auth")
    return ", ".join(words)


def loop_time() -> float:
    """Seconds on the running loop's monotonic clock."""
    return asyncio.get_running_loop().time()

"""The base of every servicer: readiness, the stream limit, and its model lifecycle."""

from __future__ import annotations

from abc import ABC
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import grpc

from services.runtime.backend import Backend
from services.runtime.errors import Unavailable
from services.runtime.limits import StreamLimiter
from services.runtime.settings import ServerSettings
from services.runtime.telemetry import Telemetry

SettingsT = TypeVar("SettingsT", bound=ServerSettings)
BackendT = TypeVar("BackendT", bound=Backend[Any])


class Companion(Protocol):
    """Another API served over a `MeshService`'s backend and limits (Riva's, beside ours)."""

    #: Its fully qualified gRPC service name, for health and reflection.
    service_name: ClassVar[str]

    def __init__(self, service: Any) -> None:
        """Serve over `service` (a `MeshService`)."""

    def register(self, server: grpc.aio.Server) -> None:
        """Add it to `server`."""


class MeshService(ABC, Generic[SettingsT, BackendT]):
    """One gRPC service backed by one model backend, hosted by `MeshServer`.

    Typed by its settings and its backend (`MeshService[AsrSettings, AsrBackend]`), so that a
    servicer reads its own settings' fields from `self.settings`. Subclasses name their generated
    `add_..._to_server` function and wrap each stream in `admit()`; the backend is loaded in
    `load` (the health service reports NOT_SERVING until it returns) and released in `aclose`.
    """

    #: Fully qualified gRPC service name, e.g. "nemotron.speech.v1.AsrService".
    service_name: ClassVar[str]
    #: Default OpenTelemetry service name (OTEL_SERVICE_NAME overrides it), e.g. "nemotron-asr".
    telemetry_name: ClassVar[str] = "nemotron-speech"

    #: The generated function that adds this servicer to a server.
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    #: The other APIs served on the same port over this service (each built with it).
    companions: ClassVar[tuple[type[Companion], ...]] = ()

    def __init__(self, settings: SettingsT, backend: BackendT) -> None:
        self.settings = settings
        self.backend = backend
        self.limiter = StreamLimiter(settings.max_streams)
        self.ready = False
        # Off until MeshServer configures it from the environment; spans are skipped while off.
        self.telemetry = Telemetry()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicer and its companions to `server`."""
        type(self).add_to_server(self, server)
        for companion in self.companions:
            companion(self).register(server)

    @property
    def service_names(self) -> tuple[str, ...]:
        """Every gRPC service `register` adds, for health and reflection."""
        return (self.service_name, *(c.service_name for c in self.companions))

    async def load(self) -> None:
        """Load and warm up the model; called once after the server starts listening."""
        await self.backend.load()

    async def aclose(self) -> None:
        """Release the model; called once after the server stopped."""
        await self.backend.aclose()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a stream slot; UNAVAILABLE while loading, RESOURCE_EXHAUSTED when full."""
        if not self.ready:
            raise Unavailable(
                "the model is still loading; wait until the health service reports SERVING"
            )
        async with self.limiter.slot():
            yield

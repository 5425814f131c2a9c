"""The base of every servicer: readiness, the stream limit, and its model lifecycle."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar, Protocol

import grpc

from services.runtime.errors import Unavailable
from services.runtime.limits import StreamLimiter
from services.runtime.settings import ServerSettings
from services.runtime.telemetry import Telemetry


class NamedBackend(Protocol):
    """What every backend tells about itself."""

    name: str

    @property
    def model_name(self) -> str:
        """Name of the loaded model (never a full path)."""
        ...


class MeshService(ABC):
    """One gRPC service backed by one model backend, hosted by `MeshServer`.

    Subclasses register their servicer, load their backend in `load` (the health service reports
    NOT_SERVING until it returns), and wrap each stream in `admit()`.
    """

    #: Fully qualified gRPC service name, e.g. "nemotron.speech.v1.AsrService".
    service_name: ClassVar[str]
    #: Default OpenTelemetry service name (OTEL_SERVICE_NAME overrides it), e.g. "nemotron-asr".
    telemetry_name: ClassVar[str] = "nemotron-speech"

    #: The model engine; set by each service's constructor.
    backend: NamedBackend

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.limiter = StreamLimiter(settings.max_streams)
        self.ready = False
        # Off until MeshServer configures it from the environment; spans are skipped while off.
        self.telemetry = Telemetry()

    @abstractmethod
    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicer to `server`."""

    @abstractmethod
    async def load(self) -> None:
        """Load and warm up the model; called once after the server starts listening."""

    async def aclose(self) -> None:  # noqa: B027  (optional hook; most services have nothing)
        """Release the model; called once after the server stopped."""

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a stream slot; UNAVAILABLE while loading, RESOURCE_EXHAUSTED when full."""
        if not self.ready:
            raise Unavailable(
                "the model is still loading; wait until the health service reports SERVING"
            )
        async with self.limiter.slot():
            yield

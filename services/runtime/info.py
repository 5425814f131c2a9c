"""ServerInfoService: what a running server is (service, backend, model, load)."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc

from nemotron.speech.v1 import info_pb2, info_pb2_grpc
from services.runtime.service import MeshService

SERVICE_NAME = info_pb2.DESCRIPTOR.services_by_name["ServerInfoService"].full_name


def package_version() -> str:
    """The installed version of this project."""
    try:
        return version("nemotron-speech-mesh")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class ServerInfoServicer(info_pb2_grpc.ServerInfoServiceServicer):
    """Answers GetServerInfo from the hosted service's live state."""

    def __init__(self, service: MeshService[Any, Any]) -> None:
        self.service = service
        self.started = time.monotonic()
        self.version = package_version()

    async def GetServerInfo(
        self, request: info_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> info_pb2.GetServerInfoResponse:
        """The service's backend, model, readiness and load."""
        service = self.service
        return info_pb2.GetServerInfoResponse(
            service=service.service_name,
            backend=service.backend.name,
            model=service.backend.model_name if service.ready else "",
            version=self.version,
            ready=service.ready,
            active_streams=service.limiter.active,
            max_streams=service.limiter.capacity,
            uptime_s=time.monotonic() - self.started,
        )

    def register(self, server: grpc.aio.Server) -> None:
        """Add this servicer to `server`."""
        info_pb2_grpc.add_ServerInfoServiceServicer_to_server(self, server)

"""LlmService.GenerateChunks: the protocol state machine in front of an `LlmBackend`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from nemotron.speech.v1 import llm_pb2, llm_pb2_grpc
from services.llm.backend import LlmBackend
from services.llm.generation import Generation, Request, Response
from services.llm.settings import LlmSettings
from services.llm.validation import chunk_policy, generation_request
from services.runtime.errors import rpc_errors
from services.runtime.protocol import first_request_required
from services.runtime.service import MeshService
from services.runtime.streams import Duplex

log = logging.getLogger(__name__)

# Without wait_for_continue, generation runs ahead of a slow reader by at most this many chunks.
_RUN_AHEAD_CHUNKS = 4


class LlmService(MeshService[LlmSettings, LlmBackend], llm_pb2_grpc.LlmServiceServicer):
    """Serves GenerateChunks with one backend shared by all calls."""

    service_name = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
    telemetry_name = "nemotron-llm"
    add_to_server = staticmethod(llm_pb2_grpc.add_LlmServiceServicer_to_server)

    @rpc_errors
    async def GenerateChunks(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        """Start, then continue_generation/cancel -> chunks, then done."""
        async with self.admit(), Duplex[Response](_RUN_AHEAD_CHUNKS) as duplex:
            requests = aiter(request_iterator)
            first = await anext(requests, None)
            if first is None:
                return
            kind = first.WhichOneof("request")
            if kind != "start":
                raise first_request_required("start", kind, "continue_generation or cancel")
            request = generation_request(first.start, self.settings)
            generation = Generation(
                self.backend,
                request,
                chunk_policy(first.start.chunking),
                first.start.chunking.wait_for_continue,
                self.settings.continue_timeout_s,
                duplex,
                self.telemetry,
                first.start.trace_context,
            )
            log.info(
                "request %s: %d messages%s",
                request.request_id or "-",
                len(request.messages),
                f" {request.messages[-1].content!r}" if self.settings.log_content else "",
            )
            generation.start()
            duplex.spawn(generation.read(requests), name="llm-reader")
            try:
                async for response in duplex.responses():
                    yield response
            finally:
                generation.abandon()

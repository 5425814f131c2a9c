"""Server reflection that serves the contracts with their comments.

The standard reflection servicer describes files from the runtime's descriptor pool, whose copies
of our .proto files carry no comments (protoc's Python generator strips them). This servicer swaps
in the documented copies from `gen/nemotron/speech/v1/descriptors.txtpb`, written by `buf
generate`, so that `grpcurl describe` shows the API's manual. Everything else is the standard
servicer.
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, text_format
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

CONTRACTS_PACKAGE = "nemotron.speech.v1"


@functools.cache
def documented_files() -> dict[str, bytes]:
    """Serialized FileDescriptorProtos of our contracts, comments included, by file name."""
    text = (importlib.resources.files(CONTRACTS_PACKAGE) / "descriptors.txtpb").read_text()
    descriptors = text_format.Parse(text, descriptor_pb2.FileDescriptorSet())
    return {file.name: file.SerializeToString() for file in descriptors.file}


class DocumentedReflectionServicer(ReflectionServicer):  # type: ignore[misc]
    """The grpc.aio reflection servicer, answering with documented descriptors of our files."""

    def _file_by_filename(self, request: Any, filename: str) -> Any:
        return _documented(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        return _documented(super()._file_containing_symbol(request, fully_qualified_name))


def _documented(
    response: reflection_pb2.ServerReflectionResponse,
) -> reflection_pb2.ServerReflectionResponse:
    if not response.HasField("file_descriptor_response"):
        return response
    documented = documented_files()
    files = response.file_descriptor_response.file_descriptor_proto
    for index, serialized in enumerate(files):
        name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
        if name in documented:
            files[index] = documented[name]
    return response


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Serve reflection for `service_names` (and reflection itself) on `server`."""
    names = [*service_names, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        DocumentedReflectionServicer(names), server
    )

"""Small helpers shared by the contract tests."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.runtime.audio import float_to_pcm16


def tone_pcm(seconds: float, rate: int = 16000, amplitude: float = 0.3) -> bytes:
    """A 440 Hz tone as LINEAR16 bytes."""
    t = np.arange(round(seconds * rate), dtype=np.float32) / rate
    return float_to_pcm16(amplitude * np.sin(2 * np.pi * 440 * t))


def silence_pcm(seconds: float, rate: int = 16000) -> bytes:
    return b"\x00\x00" * round(seconds * rate)


def frames(pcm: bytes, rate: int = 16000, frame_ms: int = 20) -> list[bytes]:
    size = rate * frame_ms // 1000 * 2
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


async def read_all(call: Any) -> list[Any]:
    return [response async for response in call]


def field_violation(error: grpc.aio.AioRpcError) -> str | None:
    """The field named by a google.rpc.BadRequest detail of `error`, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    return None


async def read_rest(call: Any) -> list[Any]:
    """Read a call driven with write()/read() until the server ends it."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def refusal(call: grpc.aio.StreamStreamCall, timeout_s: float = 10.0) -> grpc.aio.AioRpcError:
    """The error that ends `call`, a call the server refuses as it opens (limit, still loading).

    The call is read but never written: a write that crosses the server's refusal can replace
    the server's status with INTERNAL "Internal error from Core" on the client (grpc/grpc#36066),
    and the server refuses before it reads a request anyway.
    """
    try:
        async with asyncio.timeout(timeout_s):
            response = await call.read()
    except grpc.aio.AioRpcError as error:
        return error
    except TimeoutError:
        response = f"nothing in {timeout_s:g} s"
    call.cancel()
    raise AssertionError(f"the server did not refuse the call; it answered {response!r}")

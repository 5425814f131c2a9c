"""Real servers for the tests: in process, as child processes, or bare around a servicer double.

Every server here binds port 0 and reports the port it got; `free_port` is only for a target that
must be known before anything listens on it (a client dialling a server that starts later, or a
third-party server such as llama_cpp.server).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from clients.serving import wait_serving
from services.runtime.server import MeshServer
from services.runtime.service import MeshService

ROOT = Path(__file__).resolve().parent.parent

#: The line `MeshServer.start` logs once it listens; group 1 is the bound port.
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


@asynccontextmanager
async def running(service: MeshService[Any, Any], wait: bool = True) -> AsyncIterator[MeshServer]:
    """Start `service` in process on the port its settings name (0: any free one); stop it after."""
    server = MeshServer(service)
    await server.start()
    try:
        if wait:
            await server.wait_loaded()
        yield server
    finally:
        await server.stop()


def target_of(server: MeshServer) -> str:
    """The loopback target of a running in-process server."""
    return f"127.0.0.1:{server.port}"


@asynccontextmanager
async def channel_to(server: MeshServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a running in-process server."""
    async with grpc.aio.insecure_channel(target_of(server)) as channel:
        yield channel


@asynccontextmanager
async def serving_double(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[str]:
    """A bare grpc.aio server on port 0 with a servicer double registered; yields its target."""
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def free_port() -> int:
    """A loopback port nothing listens on now, for a server that starts later on it.

    Another process may take the port in between: use it only where the port must be chosen
    before the server starts.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    """A gRPC server running as a child process, and the port it reported."""

    process: asyncio.subprocess.Process
    port: int
    #: What the server logged up to and including its "listening on" line.
    head: str

    @property
    def target(self) -> str:
        """Its loopback target."""
        return f"127.0.0.1:{self.port}"

    async def wait_serving(self, timeout_s: float = 30.0) -> None:
        """Wait until health reports SERVING; fail at once if the process exits first."""
        serving = asyncio.create_task(wait_serving(self.target, timeout_s=timeout_s))
        exited = asyncio.create_task(self.process.wait())
        try:
            await asyncio.wait({serving, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (serving, exited):
                task.cancel()
            await asyncio.wait({serving, exited})
        if not serving.cancelled():
            serving.result()  # raises the TimeoutError that names the target
            return
        raise AssertionError(f"the server exited with {self.process.returncode} before SERVING")

    async def stop(self, grace_s: float = 15.0) -> str:
        """SIGTERM, then SIGKILL after `grace_s`; always reaped. Returns all it logged."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
        try:
            _, rest = await asyncio.wait_for(self.process.communicate(), grace_s)
        except TimeoutError:
            self.process.kill()
            _, rest = await self.process.communicate()
        return self.head + rest.decode(errors="replace")


async def start_server_process(
    argv: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 60.0
) -> ServerProcess:
    """Run `argv` (a server started with `--port 0`) and read its log until it reports its port."""
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    head: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            while line := (await process.stderr.readline()).decode(errors="replace"):
                head.append(line)
                if match := LISTENING.search(line):
                    return ServerProcess(process, int(match.group(1)), "".join(head))
        failure = "exited before it listened"
    except TimeoutError:
        failure = f"did not listen within {timeout_s:g} s"
    except BaseException:
        await ServerProcess(process, 0, "").stop()
        raise
    log = await ServerProcess(process, 0, "".join(head)).stop()
    raise AssertionError(f"{' '.join(argv)} {failure} (exit {process.returncode}):\n{log[-3000:]}")


async def start_serve_double(
    service: str, *flags: str, env: Mapping[str, str] | None = None
) -> ServerProcess:
    """`python -m tests.serve_double SERVICE` (a real server, test-double engine) on port 0."""
    argv = [sys.executable, "-m", "tests.serve_double", service, "--port", "0", *flags]
    return await start_server_process(argv, env)

"""Runs several servers as child processes: starts them, waits for health, stops them together.

Used by `nemotron-speech serve-all` (the GPU container's command) and by `nemotron-speech up`.
Each server is its own process, so a crash in one engine cannot take another down; when any child
exits, the others are stopped and the supervisor exits with a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Mapping, Sequence

from clients.security import ClientSecurity
from nemotron_speech.probe import probe

log = logging.getLogger(__name__)


class Supervisor:
    """A group of child processes that live and die together."""

    def __init__(self, stop_grace_s: float = 10.0) -> None:
        self.stop_grace_s = stop_grace_s
        self.children: dict[str, asyncio.subprocess.Process] = {}

    async def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> None:
        """Start a child (with `env` instead of ours, if given); its output goes to ours."""
        self.children[name] = await asyncio.create_subprocess_exec(*argv, env=env)
        log.info("started %s (pid %d)", name, self.children[name].pid)

    def check_alive(self) -> None:
        """Raise RuntimeError if any child has exited."""
        for name, child in self.children.items():
            if child.returncode is not None:
                raise RuntimeError(f"{name} exited ({child.returncode}) while starting")

    async def wait_serving(
        self, targets: dict[str, str], timeout_s: float, security: ClientSecurity | None = None
    ) -> None:
        """Wait until every target reports SERVING; fail early if a child exits.

        `security` is how to reach them (None: from the environment).
        """
        deadline = time.monotonic() + timeout_s
        pending = dict(targets)
        security = ClientSecurity.from_env() if security is None else security
        last: dict[str, str] = {}
        while pending:
            self.check_alive()
            for name, target in list(pending.items()):
                status = await probe(name, target, timeout_s=1.0, security=security)
                last[name] = status.error
                if status.serving:
                    log.info("%s is SERVING at %s", name, target)
                    del pending[name]
            if pending and time.monotonic() > deadline:
                why = "; ".join(f"{n}: {last[n]}" for n in pending if last.get(n))
                raise TimeoutError(
                    f"not SERVING after {timeout_s:g} s: {', '.join(pending)}"
                    + (f" ({why})" if why else "")
                )
            if pending:
                await asyncio.sleep(0.5)

    async def run(self) -> int:
        """Until SIGTERM/SIGINT or the first child's exit; then stop all. Returns an exit code."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waits = {asyncio.create_task(child.wait()): name for name, child in self.children.items()}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        failed = [waits[task] for task in done if task in waits]
        await self.stop()
        stopper.cancel()
        for task in waits:
            task.cancel()
        if failed:
            log.error("%s exited; stopped the others", ", ".join(failed))
            return 1
        return 0

    async def stop(self) -> None:
        """SIGTERM every child, then SIGKILL those still running after the grace period."""
        for child in self.children.values():
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        for name, child in self.children.items():
            try:
                await asyncio.wait_for(child.wait(), self.stop_grace_s)
            except TimeoutError:
                log.warning("%s did not stop in %.0f s; killing it", name, self.stop_grace_s)
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()


def serve_argv(service: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line that runs one server with this interpreter."""
    return [sys.executable, "-m", "nemotron_speech", "serve", service, *extra]

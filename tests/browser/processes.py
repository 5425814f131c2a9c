"""The three real servers and the bot's web runner as child processes on free ports.

The bot runs under Pipecat's development runner, which is its own process; the servers are
processes too, so that all four stop the same way and each keeps its own log for failures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.targets import TARGET_ENV
from tests.servers import LISTENING, ROOT, free_port

SERVE = [sys.executable, "-m", "nemotron_speech", "serve"]

#: Small settings so that SmolLM2 loads and answers quickly on a CPU.
SERVER_FLAGS = {
    "asr": ["--shutdown-grace-s", "0.5"],
    "tts": ["--shutdown-grace-s", "0.5"],
    "llm": ["--shutdown-grace-s", "0.5", "--context-window", "2048", "--slots", "1"],
}


@dataclass
class Child:
    """One child process with its combined output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        """The last lines this child wrote, headed by its name and state."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        state = "running" if self.process.poll() is None else f"exited {self.process.returncode}"
        body = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.name} ({state}), last {lines} lines of {self.log} ---\n{body}"

    def listening_port(self) -> int | None:
        """The port the child logged that it listens on (a mesh server), once it has."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        match = LISTENING.search(text)
        return int(match.group(1)) if match else None

    def listening(self) -> bool:
        """Whether it has logged its port."""
        return self.listening_port() is not None

    def check_alive(self) -> None:
        """Fail with the log's tail if the child has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited early\n{self.tail()}")

    def stop(self, grace_s: float = 10.0) -> bool:
        """SIGTERM, then SIGKILL after `grace_s`; always reaped. False if it had to be killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return False
        return True


@dataclass
class Processes:
    """Children started in order and stopped in reverse order."""

    logs: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Child:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def tails(self, lines: int = 40) -> str:
        return "\n".join(child.tail(lines) for child in reversed(self.children))

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return bool(reply.status < 500)
    except (urllib.error.URLError, OSError):
        return False


def _wait(ready: Callable[[], bool], processes: Processes, timeout_s: float, what: str) -> None:
    """Poll `ready()`; fail with the logs' tails if a child exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        for child in processes.children:
            child.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:g} s\n{processes.tails()}")
        time.sleep(0.5)


def bot_argv(bot: str, port: int) -> list[str]:
    """`nemotron-speech bot NAME` on loopback port `port` (SmallWebRTC, the default)."""
    return [
        *(sys.executable, "-m", "nemotron_speech", "bot", bot),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


@dataclass(frozen=True)
class BotUnderTest:
    """The running bot: its client page, and its process for diagnostics."""

    url: str
    bot: Child
    processes: Processes


@contextlib.contextmanager
def mesh_and_bot(logs: Path, bot: str, ready_timeout_s: float = 90.0) -> Iterator[BotUnderTest]:
    """The ASR, TTS and LLM servers (CPU backends) and `bot` on free ports, stopped afterwards."""
    processes = Processes(logs)
    try:
        servers = {
            stage: processes.start(stage, [*SERVE, stage, "--port", "0", *flags])
            for stage, flags in SERVER_FLAGS.items()
        }
        targets: dict[str, str] = {}
        for stage, server in servers.items():
            _wait(server.listening, processes, ready_timeout_s, f"{stage} to listen")
            targets[stage] = f"127.0.0.1:{server.listening_port()}"
        for stage, target in targets.items():
            _wait(partial(_serving, target), processes, ready_timeout_s, f"{stage} at {target}")
        # Pipecat's runner serves on the port it is given (the page URL is built from it), so
        # this one is chosen before the bot starts.
        port = free_port()
        child = processes.start(
            "bot",
            bot_argv(bot, port),
            env={TARGET_ENV[stage]: target for stage, target in targets.items()},
        )
        url = f"http://127.0.0.1:{port}/client/"
        _wait(partial(_answers, url), processes, 60.0, f"bot at {url}")
        yield BotUnderTest(url, child, processes)
    finally:
        processes.stop()

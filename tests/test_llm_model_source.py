"""Models by name: `hf:` references found in a Hugging Face cache that each test builds itself.

Nothing here reaches huggingface.co: the cache is offline (HF_HUB_OFFLINE=1), and the download
path runs against a test double of the Hub that writes into the cache as huggingface_hub would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

from services.llm.backend import ChatTurn, Finished, GenerationRequest, Sampling, TokenText
from services.llm.backends.model_source import (
    HfReference,
    HubUnavailable,
    ModelNotFound,
    find_in_cache,
    hub_cache,
    parts_of,
    resolve_model,
)

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/Tiny-GGUF"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes | Path]) -> Path:
    """Lay files out as huggingface_hub does: blobs, a snapshot of links, refs/main."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    for name, content in files.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            link.symlink_to(content)
            continue
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(content)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face cache."""
    cache = tmp_path / "hub"
    cache.mkdir()
    for variable in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def quants(cache: Path) -> Path:
    """A repo with several quantisations, a qualified variant, a projector and a split file."""
    return add_to_cache(
        cache,
        REPO,
        {
            "Tiny-Q4_K_M.gguf": b"q4km",
            "Tiny-UD-Q4_K_M.gguf": b"ud",
            "Tiny-Q8_0.gguf": b"q8",
            "Tiny-UD-Q4_K_XL.gguf": b"xl",
            "mmproj-Q8_0.gguf": b"projector",
            "BF16/Tiny-BF16-00001-of-00002.gguf": b"bf16 one",
            "BF16/Tiny-BF16-00002-of-00002.gguf": b"bf16 two",
            "README.md": b"# Tiny",
        },
    )


def test_a_quantisation_name_finds_its_file_in_the_cache(quants):
    assert resolve_model(f"hf:{REPO}/Q8_0") == quants / "Tiny-Q8_0.gguf"
    assert resolve_model(f"hf:{REPO}/Q4_K_XL") == quants / "Tiny-UD-Q4_K_XL.gguf"
    # The plainest name wins over a qualified variant of the same quantisation.
    assert resolve_model(f"hf:{REPO}/Q4_K_M") == quants / "Tiny-Q4_K_M.gguf"
    assert resolve_model(f"hf:{REPO}/Q8_0").read_bytes() == b"q8"


def test_the_quantisation_name_is_matched_whatever_its_case(quants, cache):
    assert resolve_model(f"hf:{REPO}/q8_0") == quants / "Tiny-Q8_0.gguf"
    lower = add_to_cache(cache, "acme/lower", {"tiny-instruct-q4_k_m.gguf": b"x"})
    assert resolve_model("hf:acme/lower/Q4_K_M") == lower / "tiny-instruct-q4_k_m.gguf"


def test_an_exact_file_is_found_as_named(quants):
    assert resolve_model(f"hf:{REPO}:Tiny-UD-Q4_K_M.gguf") == quants / "Tiny-UD-Q4_K_M.gguf"


def test_a_multi_part_gguf_resolves_to_its_first_part(quants):
    first = quants / "BF16" / "Tiny-BF16-00001-of-00002.gguf"
    assert resolve_model(f"hf:{REPO}/bf16") == first
    assert resolve_model(f"hf:{REPO}:BF16/Tiny-BF16-00002-of-00002.gguf") == first
    assert parts_of("BF16/Tiny-BF16-00001-of-00002.gguf") == [
        "BF16/Tiny-BF16-00001-of-00002.gguf",
        "BF16/Tiny-BF16-00002-of-00002.gguf",
    ]


def test_a_multi_part_gguf_with_a_part_missing_is_not_cached(cache):
    add_to_cache(
        cache, REPO, {"Tiny-Q8_0-00001-of-00003.gguf": b"1", "Tiny-Q8_0-00002-of-00003.gguf": b"2"}
    )
    assert find_in_cache(HfReference.parse(f"hf:{REPO}/Q8_0"), cache) is None
    with pytest.raises(ModelNotFound, match=r"--include '\*\[Qq\]8_0\*\.gguf'"):
        resolve_model(f"hf:{REPO}/Q8_0")


def test_a_missing_model_says_where_it_looked_and_how_to_fetch_it(cache):
    with pytest.raises(ModelNotFound) as caught:
        resolve_model("hf:unsloth/Nemotron-3-Nano-30B-A3B-GGUF/Q8_0")
    message = str(caught.value)
    folder = cache / "models--unsloth--Nemotron-3-Nano-30B-A3B-GGUF"
    assert f"not in the Hugging Face cache at {folder}" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert message.splitlines()[-1] == (
        "  hf download unsloth/Nemotron-3-Nano-30B-A3B-GGUF --include '*[Qq]8_0*.gguf' "
        f"--cache-dir {cache}"
    )
    assert isinstance(caught.value, FileNotFoundError)  # the server's start-up error path


def test_the_fetch_command_fetches_every_part_of_an_exact_split_file(cache):
    with pytest.raises(ModelNotFound) as caught:
        resolve_model(f"hf:{REPO}:Q8_0/Tiny-Q8_0-00001-of-00002.gguf")
    assert f"download {REPO} --include 'Q8_0/Tiny-Q8_0-*-of-00002.gguf'" in str(caught.value)


def test_the_fetch_command_follows_the_installed_huggingface_hub(cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "__version__", "0.30.2")
    with pytest.raises(ModelNotFound, match=f"huggingface-cli download {REPO} --include"):
        resolve_model(f"hf:{REPO}/Q8_0")


def test_hf_home_places_the_cache_when_hf_hub_cache_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / "hub"


def test_a_plain_path_works_unchanged_and_a_missing_one_fails_clearly(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_model(str(model)) == model
    with pytest.raises(ModelNotFound, match=f"no GGUF model at {tmp_path / 'absent.gguf'}"):
        resolve_model(str(tmp_path / "absent.gguf"))


@pytest.mark.parametrize(
    "text", ["hf:acme", "hf:acme/Tiny-GGUF", "hf:acme/Tiny-GGUF:README.md", "hf:a/b/c/Q8_0"]
)
def test_a_malformed_reference_shows_both_forms(text):
    with pytest.raises(ValueError, match=r"hf:ORG/REPO/QUANT .* or hf:ORG/REPO:FILE\.gguf"):
        HfReference.parse(text)


class HubDouble:
    """The Hub as a dict of files; downloads land in the cache laid out as huggingface_hub's."""

    def __init__(self, files: dict[str, bytes], *, fail: str = "") -> None:
        self.files = files
        self.fail = fail
        self.downloaded: list[str] = []

    def list_files(self, repo_id: str) -> list[str]:
        if self.fail:
            raise HubUnavailable(self.fail)
        return list(self.files)

    def download(self, repo_id: str, filename: str, cache: Path) -> Path:
        self.downloaded.append(filename)
        return add_to_cache(cache, repo_id, {filename: self.files[filename]}) / filename


def test_online_a_missing_model_is_downloaded_into_the_cache(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub = HubDouble(
        {
            "Tiny-Q4_K_M.gguf": b"q4",
            "Q8_0/Tiny-Q8_0-00001-of-00002.gguf": b"one",
            "Q8_0/Tiny-Q8_0-00002-of-00002.gguf": b"two",
        }
    )
    path = resolve_model(f"hf:{REPO}/Q8_0", hub)
    assert hub.downloaded == [
        "Q8_0/Tiny-Q8_0-00001-of-00002.gguf",
        "Q8_0/Tiny-Q8_0-00002-of-00002.gguf",
    ]
    assert path.read_bytes() == b"one"
    # Now cached: found again without the Hub, even offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(f"hf:{REPO}/Q8_0") == path


def test_online_an_unreachable_hub_gives_the_same_clear_error(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelNotFound, match="could not provide it \\(connection refused\\)"):
        resolve_model(f"hf:{REPO}/Q8_0", HubDouble({}, fail="connection refused"))


def test_online_a_quantisation_the_repo_lacks_lists_what_it_has(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub = HubDouble({"Tiny-Q4_K_M.gguf": b"q4", "README.md": b""})
    with pytest.raises(ModelNotFound, match=r"matches 'Q8_0' \(it has: Tiny-Q4_K_M\.gguf\)"):
        resolve_model(f"hf:{REPO}/Q8_0", hub)


@pytest.mark.slow
async def test_llama_cpp_loads_and_generates_a_model_given_by_name(cache):
    from services.llm.backends.llama_cpp import LlamaCppLlmBackend, default_model_path

    repo = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
    real = default_model_path()
    snapshot = add_to_cache(cache, repo, {"smollm2-135m-instruct-q4_1.gguf": real})
    backend = LlamaCppLlmBackend(
        f"hf:{repo}/q4_1", slots=1, context_window=512, threads=2, extra_buffers="off"
    )
    await backend.load()
    try:
        assert backend.model_path == snapshot / "smollm2-135m-instruct-q4_1.gguf"
        request = GenerationRequest(
            "t", (ChatTurn("user", "Hi"),), Sampling(temperature=0.0, max_tokens=8)
        )
        events = [event async for event in backend.generate(request)]
    finally:
        await backend.aclose()
    assert sum(e.tokens for e in events if isinstance(e, TokenText)) >= 1
    assert isinstance(events[-1], Finished)


@pytest.mark.slow
async def test_llama_cpp_fails_before_loading_anything_when_the_model_is_not_cached(cache):
    from services.llm.backends.llama_cpp import LlamaCppLlmBackend

    backend = LlamaCppLlmBackend(f"hf:{REPO}/Q8_0", slots=1, threads=2, extra_buffers="off")
    with pytest.raises(ModelNotFound, match="hf download"):
        await backend.load()
    assert backend.model is None


@pytest.mark.slow
def test_the_server_start_prints_the_fetch_command_and_exits(cache):
    done = subprocess.run(
        [sys.executable, "-m", "services.llm", "--port", "0", "--model", f"hf:{REPO}/Q8_0"],
        cwd=ROOT,
        env={**os.environ, "NEMOTRON_LLM_EXTRA_BUFFERS": "off"},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 2, done.stderr
    assert f"hf download {REPO} --include '*[Qq]8_0*.gguf'" in done.stderr


def test_a_malformed_reference_is_a_settings_error_caught_by_check_config():
    import pydantic

    from services.llm.settings import LlmSettings

    with pytest.raises(pydantic.ValidationError, match="hf:ORG/REPO/QUANT"):
        LlmSettings(model="hf:unsloth")
    assert LlmSettings(model="hf:unsloth/Nemotron-3-Nano-30B-A3B-GGUF/Q8_0").model.startswith("hf:")
    assert LlmSettings(model="/models/any.gguf").model == "/models/any.gguf"

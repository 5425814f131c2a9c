"""The vllm backend: its pure mapping here; the engine itself only where vLLM and a GPU are."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from types import SimpleNamespace

import pytest

from services.llm.backend import Finished, FinishReason, PromptUsage, Sampling, TokenText
from services.llm.backends.vllm import VllmLlmBackend, finish_reason, output_events, sampling_kwargs
from services.llm.generation import GenerationStats
from services.llm.settings import LlmSettings


def test_choosing_vllm_imports_nothing_of_it_until_load():
    loaded = set(sys.modules)
    backend = VllmLlmBackend.from_settings(LlmSettings(backend="vllm", model="org/Some-Model"))
    assert backend.model_name == "Some-Model"
    assert not any(name == "vllm" or name.startswith("vllm.") for name in set(sys.modules) - loaded)


async def test_loading_without_vllm_installed_says_how_to_install_it():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    backend = VllmLlmBackend("org/Some-Model")
    with pytest.raises(ImportError, match=re.escape("nemotron-speech-mesh[vllm]")):
        await backend.load()


def test_the_backend_needs_a_model():
    with pytest.raises(ValueError, match="NEMOTRON_LLM_MODEL"):
        VllmLlmBackend.from_settings(LlmSettings(backend="vllm"))


def test_sampling_maps_to_vllm_arguments():
    kwargs = sampling_kwargs(Sampling(temperature=0.0, top_k=0, max_tokens=9, seed=4, stop=("x",)))
    assert kwargs == {
        "temperature": 0.0,
        "top_p": 0.95,
        "top_k": 0,
        "max_tokens": 9,
        "repetition_penalty": 1.0,
        "stop": ["x"],
        "seed": 4,
    }
    assert "seed" not in sampling_kwargs(Sampling())


def test_delta_outputs_carry_texts_tokens_cache_and_finish():
    stats = GenerationStats()

    def output(text, tokens, reason=None):
        completion = SimpleNamespace(text=text, token_ids=tokens, finish_reason=reason)
        return SimpleNamespace(num_cached_tokens=16, outputs=[completion])

    first = output_events(output("Hello", [1]), 20)
    assert first == [PromptUsage(20, 16), TokenText("Hello", 1)]
    second = output_events(output(" world", [2, 3], "length"), 20)
    assert second[1:] == [TokenText(" world", 2), Finished(FinishReason.LENGTH)]
    for event in (*first, *second):
        stats.record(event)
    assert stats.completion_tokens == 3
    assert stats.cached_prompt_tokens == 16
    assert stats.finish_reason == FinishReason.LENGTH
    assert finish_reason("stop") == FinishReason.STOP
    assert finish_reason("abort") == FinishReason.CANCELLED


@pytest.mark.gpu
async def test_the_engine_generates_where_vllm_and_a_gpu_are():
    pytest.importorskip("vllm", reason="needs the vllm extra (GPU only)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = os.environ.get("NEMOTRON_TEST_VLLM_MODEL", "")
    if not model:
        pytest.skip("set NEMOTRON_TEST_VLLM_MODEL to a local model folder (no hub access in tests)")
    from services.llm.backend import ChatTurn, GenerationRequest

    backend = VllmLlmBackend(model, context_window=2048)
    await backend.load()
    try:
        stats = GenerationStats()
        request = GenerationRequest("t", (ChatTurn("user", "Hi"),), Sampling(max_tokens=8))
        async for event in backend.generate(request):
            stats.record(event)
        assert stats.completion_tokens >= 1
    finally:
        await backend.aclose()

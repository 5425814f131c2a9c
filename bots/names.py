"""The bots, by name (light to import: the CLI lists them without loading Pipecat)."""

BOTS = ("interleaved_streaming", "simple_vad", "vllm")
DEFAULT_BOT = BOTS[0]

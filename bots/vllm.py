"""The default bot's pipeline with the LLM served by vLLM through the LLM server.

The bot still speaks GenerateChunks to the mesh's LLM server (NVIDIA_LLM_URL); that server runs
its `openai_upstream` backend against vLLM's OpenAI-compatible endpoint, so chunking, flow
control and cancel work the same. `nemotron-speech up --bot vllm --vllm-url URL` starts it so.

    python -m bots.vllm      # or: nemotron-speech bot vllm
"""

from pipecat.runner.types import RunnerArguments

from bots.pipeline import BotConfig
from bots.runner import run_bot
from bots.turn_settings import TurnSettings

CONFIG = BotConfig(name="vllm", turn=TurnSettings(vad_stop_s=0.2, smart_turn=True), max_tokens=160)


async def bot(runner_args: RunnerArguments) -> None:
    """Entry point for Pipecat's runner."""
    await run_bot(CONFIG, runner_args)


if __name__ == "__main__":
    from bots.runner import serve

    serve()

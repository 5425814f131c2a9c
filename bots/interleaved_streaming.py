"""The default bot: Silero VAD (0.2 s stop) and SmartTurn v3 decide the end of the user's turn.

A short VAD stop asks SmartTurn early whether the user is done; the STT adapter meanwhile gets a
soft hypothesis from the ASR server, and finalizes as soon as SmartTurn says the turn is over.
TTS is adaptive: STREAM for the first chunk of a reply, BATCH after.

    python -m bots.interleaved_streaming      # or: nemotron-speech bot interleaved_streaming
"""

from pipecat.runner.types import RunnerArguments

from bots.pipeline import BotConfig
from bots.runner import run_bot
from bots.turn_settings import TurnSettings

CONFIG = BotConfig(name="interleaved_streaming", turn=TurnSettings(vad_stop_s=0.2, smart_turn=True))


async def bot(runner_args: RunnerArguments) -> None:
    """Entry point for Pipecat's runner."""
    await run_bot(CONFIG, runner_args)


if __name__ == "__main__":
    from bots.runner import serve

    serve()

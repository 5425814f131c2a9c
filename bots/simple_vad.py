"""Silero VAD with a 0.8 s stop and no SmartTurn: the turn ends when the VAD says so.

Slower to answer than the default bot, but the turn end depends on nothing but silence, which
makes it the bot for testing the ASR.

    python -m bots.simple_vad      # or: nemotron-speech bot simple_vad
"""

from pipecat.runner.types import RunnerArguments

from bots.pipeline import BotConfig
from bots.runner import run_bot
from bots.turn_settings import TurnSettings

CONFIG = BotConfig(name="simple_vad", turn=TurnSettings(vad_stop_s=0.8, smart_turn=False))


async def bot(runner_args: RunnerArguments) -> None:
    """Entry point for Pipecat's runner."""
    await run_bot(CONFIG, runner_args)


if __name__ == "__main__":
    from bots.runner import serve

    serve()

"""Pipecat's RTVI on the bot: what the browser client at /client hears over the data channel.

The worker puts the `RTVIProcessor` first in the pipeline and its `RTVIObserver` among the
observers. The observer turns frames into RTVI messages: the user's transcripts (interim and
final, `user-input`), the bot's text as it is spoken (`bot-output`), who started or stopped
speaking, interruptions, and every service's TTFB and processing time (`metrics`). The client
asks for an interruption with the client message `interrupt`, which the processor answers.
"""

from __future__ import annotations

from loguru import logger
from pipecat.processors.frameworks.rtvi import RTVIObserverParams, RTVIProcessor
from pipecat.processors.frameworks.rtvi.models import ClientMessage

#: The client message (`client-message` with `t` = this) that cuts the bot's reply off.
INTERRUPT = "interrupt"


def observer_params() -> RTVIObserverParams:
    """What the page shows, and nothing it does not (no per-token LLM text, no context)."""
    return RTVIObserverParams(
        bot_llm_enabled=False,  # every LLM chunk; the page shows what is spoken, not generated
        user_llm_enabled=False,  # the user's text again, as it enters the context
        metrics_enabled=True,
    )


def client_rtvi() -> RTVIProcessor:
    """An RTVI processor that answers the client's `interrupt` message."""
    rtvi = RTVIProcessor()

    @rtvi.event_handler("on_client_message")
    async def _on_client_message(processor: RTVIProcessor, message: ClientMessage) -> None:
        if message.type != INTERRUPT:
            await processor.send_error_response(message, f"unknown client message {message.type}")
            return
        logger.info("client asked for an interruption")
        await processor.interrupt_bot()
        await processor.send_server_response(message, {"interrupted": True})

    return rtvi

"""Runs a bot under Pipecat's development runner.

SmallWebRTC with our browser client at http://localhost:7860/client by default; Daily with
`-t daily` (needs DAILY_API_KEY and the `daily` extra).
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from bots.names import BOTS
from bots.pipeline import BotConfig, build_worker
from bots.shutdown import cancelled_on_stop
from bots.tracing import configure_bot_tracing
from bots.turn_settings import TurnSettingsError, flags_to_environment

#: Our browser client: plain WebRTC, nothing fetched from the internet. The prebuilt client that
#: Pipecat's runner mounts manages devices with daily-js, which downloads Daily's call-machine
#: bundle from c.daily.co on Connect, so it cannot connect on an offline machine.
CLIENT_PAGE = Path(__file__).with_name("client") / "index.html"


def _transport_params() -> dict[str, object]:
    def webrtc() -> TransportParams:
        return TransportParams(audio_in_enabled=True, audio_out_enabled=True)

    def daily() -> object:
        from pipecat.transports.daily.transport import DailyParams  # the `daily` extra

        return DailyParams(audio_in_enabled=True, audio_out_enabled=True)

    return {"webrtc": webrtc, "daily": daily}


async def run_bot(config: BotConfig, runner_args: RunnerArguments) -> None:
    """Run one session of `config` on the transport the runner connected.

    The NEMOTRON_BOT_* variables (and the turn flags, which `serve` turned into them) override
    the bot's turn settings.
    """
    configure_bot_tracing()
    config = dataclasses.replace(config, turn=config.turn.with_environment())
    transport = await create_transport(runner_args, _transport_params())  # type: ignore[arg-type]
    worker, _services = build_worker(config, transport)

    @transport.event_handler("on_client_disconnected")
    async def _disconnected(_transport: object, _client: object) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    with cancelled_on_stop(runner):  # an open call must not keep a stopping bot alive
        await runner.add_workers(worker)
        await runner.run()


def serve_client_page() -> None:
    """Answer /client/ with CLIENT_PAGE, ahead of the runner's prebuilt UI (mounted later)."""
    from fastapi.responses import FileResponse
    from pipecat.runner.run import app

    @app.get("/client/", include_in_schema=False)
    async def _client() -> FileResponse:
        return FileResponse(CLIENT_PAGE)


def serve() -> None:
    """Pipecat's runner for the bot module running as __main__ (flags from sys.argv)."""
    from pipecat.runner.run import main as runner_main

    try:
        sys.argv[1:] = flags_to_environment(sys.argv[1:], os.environ)
    except TurnSettingsError as err:
        raise SystemExit(f"{sys.argv[0]}: {err}") from None
    if not any(arg in ("-t", "--transport") or arg.startswith("--transport=") for arg in sys.argv):
        sys.argv += ["-t", "webrtc"]
    if "daily" not in sys.argv and "--transport=daily" not in sys.argv:
        serve_client_page()
    runner_main()


def main(name: str, argv: Sequence[str] = ()) -> None:
    """Serve bot `name` with Pipecat's runner; `argv` are the runner's flags (-t, --port...)."""
    if name not in BOTS:
        raise SystemExit(f"unknown bot {name!r}; choose one of: {', '.join(BOTS)}")
    # The runner looks for `bot()` in __main__, so the bot module runs as __main__ (and calls
    # serve() from there).
    sys.argv = [f"bots.{name}", *argv]
    runpy.run_module(f"bots.{name}", run_name="__main__", alter_sys=True)

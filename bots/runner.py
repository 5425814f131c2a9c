"""Runs a bot under Pipecat's development runner.

SmallWebRTC with its browser client at http://localhost:7860/client by default; Daily with
`-t daily` (needs DAILY_API_KEY and the `daily` extra).
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence

from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from bots.names import BOTS
from bots.pipeline import BotConfig, build_worker
from bots.tracing import configure_bot_tracing


def _transport_params() -> dict[str, object]:
    def webrtc() -> TransportParams:
        return TransportParams(audio_in_enabled=True, audio_out_enabled=True)

    def daily() -> object:
        from pipecat.transports.daily.transport import DailyParams  # the `daily` extra

        return DailyParams(audio_in_enabled=True, audio_out_enabled=True)

    return {"webrtc": webrtc, "daily": daily}


async def run_bot(config: BotConfig, runner_args: RunnerArguments) -> None:
    """Run one session of `config` on the transport the runner connected."""
    configure_bot_tracing()
    transport = await create_transport(runner_args, _transport_params())  # type: ignore[arg-type]
    worker, _services = build_worker(config, transport)

    @transport.event_handler("on_client_disconnected")
    async def _disconnected(_transport: object, _client: object) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


def main(name: str, argv: Sequence[str] = ()) -> None:
    """Serve bot `name` with Pipecat's runner; `argv` are the runner's flags (-t, --port...)."""
    if name not in BOTS:
        raise SystemExit(f"unknown bot {name!r}; choose one of: {', '.join(BOTS)}")
    # The runner looks for `bot()` in __main__, so the bot module runs as __main__.
    sys.argv = [f"bots.{name}", *argv]
    if not any(arg in ("-t", "--transport") or arg.startswith("--transport=") for arg in argv):
        sys.argv += ["-t", "webrtc"]
    runpy.run_module(f"bots.{name}", run_name="__main__", alter_sys=True)

"""Ends every open bot session when the bot's process is asked to stop.

Pipecat's development runner serves the bot with uvicorn, which on SIGTERM or SIGINT waits for
the running sessions before it exits: each is a background task of the request that opened the
call, and a call left open never ends by itself, so the process would hang until its supervisor
killed it. A session opened here cancels its pipeline on those signals; uvicorn, which still
gets the signal too, then finds nothing left to wait for and exits.

The handler is chained in front of whatever handler the process had (uvicorn's), not put in its
place through the event loop, which would keep the signal from uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from pipecat.workers.runner import WorkerRunner

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_REASON = "the bot is stopping"

_open_sessions: dict[WorkerRunner, asyncio.AbstractEventLoop] = {}
_OURS = "_cancels_bot_sessions"
_pending: set[asyncio.Future[None]] = set()


@contextlib.contextmanager
def cancelled_on_stop(runner: WorkerRunner) -> Iterator[None]:
    """Within this block, SIGTERM or SIGINT cancels `runner`, then goes on to the old handler."""
    # Only the main thread may set signal handlers; a bot run elsewhere (a test's thread) is
    # stopped by whoever runs it.
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            # Chained once, and again after uvicorn has put its saved handlers back.
            if not getattr(current, _OURS, False):
                signal.signal(sig, _chain(current))
    _open_sessions[runner] = asyncio.get_running_loop()
    try:
        yield
    finally:
        _open_sessions.pop(runner, None)


def _chain(previous: Any) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        for runner, loop in list(_open_sessions.items()):
            # Signal handlers run between bytecodes: hand the cancel to the runner's loop.
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_cancel_soon, runner)
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):  # None: a handler set outside Python
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    setattr(handler, _OURS, True)
    return handler


def _cancel_soon(runner: WorkerRunner) -> None:
    log.info("stop signal: ending the open call")
    task = asyncio.ensure_future(runner.cancel(reason=STOP_REASON))
    _pending.add(task)
    task.add_done_callback(_pending.discard)

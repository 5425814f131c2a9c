"""A bot asked to stop with a call open ends the call and its process at once.

Pipecat's runner (uvicorn) waits for running sessions before it exits, so a bot whose call stays
open used to ignore SIGTERM until its supervisor killed it 10 s later (bots/shutdown.py).
Headless Chromium holds a real WebRTC call open while the bot is stopped.
"""

from __future__ import annotations

import time

import pytest
from selenium import webdriver

from tests.browser.chromium import chromium, chromium_paths
from tests.browser.page import record_peer_connections
from tests.browser.processes import mesh_and_bot
from tests.test_bots_browser import start_call, wait_for, write_question

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: What the issue asks of a bot (and of `up`) stopped with a call open.
STOP_WITHIN_S = 2.0


def test_a_bot_stopped_with_a_call_open_ends_it_and_exits_within_2_s(tmp_path):
    paths = chromium_paths()
    if paths is None:
        pytest.skip("needs Debian's chromium and chromium-driver on PATH (.ci/run installs them)")
    question = write_question(tmp_path / "question.wav")
    with mesh_and_bot(tmp_path, "interleaved_streaming") as stack:
        with chromium(paths, tmp_path / "profile", question, tmp_path / "driver.log") as driver:
            record_peer_connections(driver)
            driver.get(stack.url)
            start_call(driver, stack)
            time.sleep(2.0)  # the call is running: the bot hears the question
            started = time.monotonic()
            stopped = stack.bot.stop(grace_s=10.0)
            took = time.monotonic() - started
            assert stopped, f"the bot ignored SIGTERM for 10 s with a call open\n{stack.bot.tail()}"
            assert took <= STOP_WITHIN_S, (
                f"the bot took {took:.1f} s to stop with a call open\n{stack.bot.tail()}"
            )
            states = wait_for(lambda: connection_states(driver), _all_ended, 15.0)
            assert _all_ended(states), f"the page's call did not end with the bot: {states}"


def connection_states(driver: webdriver.Chrome) -> list[str]:
    """The `connectionState` of every peer connection the page made."""
    states: list[str] = driver.execute_script(
        "return (window.__peerConnections || []).map((pc) => pc.connectionState);"
    )
    return states


def _all_ended(states: list[str]) -> bool:
    return bool(states) and all(s in ("disconnected", "failed", "closed") for s in states)

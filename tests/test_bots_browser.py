"""The browser client end to end: headless Chromium talks to the default bot over WebRTC.

The three real servers (CPU backends) and `nemotron-speech bot interleaved_streaming` run as
processes on free ports. Chromium (Debian's package, driven by Selenium) opens the bot's client
page with a fake microphone that plays a spoken question from a WAV file, clicks Connect, and the
test waits until the bot's reply audio arrives on the peer connection. The bot does not greet and
sends exact silence otherwise, so any audio energy received is its spoken answer. A screenshot of
the page is kept in artifacts/browser_client.png.
"""

from __future__ import annotations

import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.browser.chromium import chromium, chromium_paths, console
from tests.browser.page import InboundAudio, inbound_audio, record_peer_connections
from tests.browser.processes import ROOT, BotUnderTest, mesh_and_bot
from tests.speech import speech_pcm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

QUESTION = "What is the capital of France?"
RATE = 48000
SCREENSHOT = ROOT / "artifacts" / "browser_client.png"
#: totalAudioEnergy sums audioLevel^2 * seconds: the bot's silence gives exactly 0, and one second
#: of quiet speech (level 0.05) already 0.0025.
SPOKEN_ENERGY = 0.001
REPLY_TIMEOUT_S = 90.0

T = TypeVar("T")


def write_question(path: Path) -> Path:
    """The question, a second of silence before it and 20 s after (Chromium loops the file)."""
    second = b"\x00\x00" * RATE
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(second + speech_pcm(QUESTION, RATE) + second * 20)
    return path


def wait_for(check: Callable[[], T], done: Callable[[T], bool], timeout_s: float) -> T:
    """Poll `check()` until `done` holds for its value; the last value when time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def button(driver: webdriver.Chrome, label: str, timeout_s: float = 20.0) -> WebElement | None:
    """The enabled button labelled `label`, once the page shows it."""
    xpath = f"//button[normalize-space()='{label}']"
    found = wait_for(
        lambda: [b for b in driver.find_elements(By.XPATH, xpath) if b.is_enabled()],
        bool,
        timeout_s,
    )
    return found[0] if found else None


def failure(
    what: str, stack: BotUnderTest, driver: webdriver.Chrome, audio: InboundAudio | None
) -> str:
    """`what` went wrong, with the page's console and the tail of every process's log."""
    page = console(driver)
    hint = ""
    if "ERR_NAME_NOT_RESOLVED" in page or "ERR_INTERNET_DISCONNECTED" in page:
        hint = (
            "\nThe client page loads resources from the internet (see the console below); "
            "the bot's client must work offline.\n"
        )
    return (
        f"{what}\ninbound audio: {audio}{hint}\n--- browser console ---\n{page}\n"
        f"{stack.processes.tails()}"
    )


def test_browser_client_hears_the_bots_reply(tmp_path):
    paths = chromium_paths()
    if paths is None:
        pytest.skip(
            "needs Debian's chromium and chromium-driver on PATH "
            "(apt-get install -y chromium chromium-driver; .ci/run installs them)"
        )
    question = write_question(tmp_path / "question.wav")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    with mesh_and_bot(tmp_path, "interleaved_streaming") as stack:
        with chromium(paths, tmp_path / "profile", question, tmp_path / "driver.log") as driver:
            record_peer_connections(driver)
            driver.get(stack.url)
            try:
                connect = button(driver, "Connect")
                assert connect is not None, failure("no Connect button", stack, driver, None)
                connect.click()
                audio: InboundAudio = wait_for(
                    lambda: inbound_audio(driver), lambda a: "connected" in a.states, 30.0
                )
                assert "connected" in audio.states, failure(
                    "no connected peer connection 30 s after Connect", stack, driver, audio
                )
                audio = wait_for(
                    lambda: inbound_audio(driver),
                    lambda a: a.audio_energy > SPOKEN_ENERGY,
                    REPLY_TIMEOUT_S,
                )
                assert audio.audio_energy > SPOKEN_ENERGY, failure(
                    f"no spoken reply within {REPLY_TIMEOUT_S:g} s", stack, driver, audio
                )
                assert audio.live_tracks >= 1, failure(
                    "the reply is not on a live <audio> track", stack, driver, audio
                )
            finally:
                driver.save_screenshot(str(SCREENSHOT))
            disconnect = button(driver, "Disconnect")
            assert disconnect is not None, failure("no Disconnect button", stack, driver, audio)
            disconnect.click()
        stopped = stack.bot.stop(grace_s=15.0)
        assert stopped, f"the bot did not stop on SIGTERM within 15 s\n{stack.bot.tail()}"

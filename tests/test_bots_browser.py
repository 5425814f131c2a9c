"""The browser client end to end: headless Chromium talks to the default bot over WebRTC.

The three real servers (CPU backends) and `nemotron-speech bot interleaved_streaming` run as
processes on free ports. Chromium (Debian's package, driven by Selenium) opens the bot's client
page with a fake microphone that plays a spoken question from a WAV file, clicks Connect, and the
test waits until the bot's reply audio arrives on the peer connection. The bot does not greet and
sends exact silence otherwise, so any audio energy received is its spoken answer. Then it reads
what the page shows from the bot's RTVI messages: the user's final transcript (within a WER bound
of the question), the bot's spoken reply, and the turn's stage timings. A screenshot of the page is
kept in artifacts/browser_client.png (the README shows it).
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
from tests.browser.page import (
    InboundAudio,
    PageView,
    inbound_audio,
    page_view,
    record_peer_connections,
)
from tests.browser.processes import ROOT, BotUnderTest, mesh_and_bot
from tests.speech import speech_pcm, wer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

QUESTION = "What is the capital of France?"
RATE = 48000
SCREENSHOT = ROOT / "artifacts" / "browser_client.png"
#: totalAudioEnergy sums audioLevel^2 * seconds: the bot's silence gives exactly 0, and one second
#: of quiet speech (level 0.05) already 0.0025.
SPOKEN_ENERGY = 0.001
REPLY_TIMEOUT_S = 90.0
LEAD_SILENCE_S = 4
#: The question goes through Chromium's fake microphone, Opus and 48 kHz resampling before the
#: ASR hears it; one wrong word in six is the most this test allows.
MAX_WER = 0.2
#: Every stage the page times for a turn: ASR final, LLM first chunk, TTS first audio, and
#: voice-to-voice (user stopped speaking to bot started speaking).
STAGES = ("asr", "llm", "tts", "v2v")
#: How long after the reply's first audio the page may take to show the turn complete (the ASR's
#: TTFB is reported up to 2 s after the end of speech).
PAGE_TIMEOUT_S = 15.0

T = TypeVar("T")


def write_question(path: Path) -> Path:
    """The question, silence before it and 20 s after (Chromium loops the file).

    The fake microphone starts playing when the page opens it, before the call is up and the
    bot's session listens: the silence before the question covers that, or the bot would hear
    only its end.
    """
    second = b"\x00\x00" * RATE
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(second * LEAD_SILENCE_S + speech_pcm(QUESTION, RATE) + second * 20)
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
    what: str,
    stack: BotUnderTest,
    driver: webdriver.Chrome,
    audio: InboundAudio | None,
    view: PageView | None = None,
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
        f"{what}\ninbound audio: {audio}\npage: {view}{hint}\n--- browser console ---\n{page}\n"
        f"{stack.processes.tails()}"
    )


def start_call(driver: webdriver.Chrome, stack: BotUnderTest) -> InboundAudio:
    """Click Connect and wait until the call's peer connection is up."""
    connect = button(driver, "Connect")
    assert connect is not None, failure("no Connect button", stack, driver, None)
    connect.click()
    audio: InboundAudio = wait_for(
        lambda: inbound_audio(driver), lambda a: "connected" in a.states, 30.0
    )
    assert "connected" in audio.states, failure(
        "no connected peer connection 30 s after Connect", stack, driver, audio
    )
    return audio


def page_shows_the_turn(view: PageView) -> bool:
    """The page shows a final user transcript, a bot reply and a fully timed turn."""
    return bool(view.user_finals and view.bot_lines and view.timed_turns(STAGES))


def test_browser_client_hears_the_reply_and_shows_the_turn(tmp_path):
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
                audio = start_call(driver, stack)
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
                view = wait_for(lambda: page_view(driver), page_shows_the_turn, PAGE_TIMEOUT_S)
                heard = " ".join(view.user_finals)
                assert view.user_finals and wer(QUESTION, heard) <= MAX_WER, failure(
                    f"the page does not show the question as the user's final transcript "
                    f"(WER <= {MAX_WER:g})",
                    *(stack, driver, audio, view),
                )
                assert any(any(c.isalpha() for c in line) for line in view.bot_lines), failure(
                    "the page shows no reply text", stack, driver, audio, view
                )
                timed = view.timed_turns(STAGES)
                assert timed, failure(
                    f"no turn row with numbers for {', '.join(STAGES)}", stack, driver, audio, view
                )
                assert all(0 < timed[0][stage] < 30_000 for stage in STAGES), failure(
                    "a stage timing out of range", stack, driver, audio, view
                )
                assert all(cell.endswith("ms") for cell in view.p50), failure(
                    "no running p50 for every stage", stack, driver, audio, view
                )
            finally:
                driver.save_screenshot(str(SCREENSHOT))
            disconnect = button(driver, "Disconnect")
            assert disconnect is not None, failure("no Disconnect button", stack, driver, audio)
            disconnect.click()
        stopped = stack.bot.stop(grace_s=15.0)
        assert stopped, f"the bot did not stop on SIGTERM within 15 s\n{stack.bot.tail()}"

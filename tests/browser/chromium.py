"""Headless Chromium from the Debian packages (`chromium`, `chromium-driver`) under Selenium.

Never a downloaded browser: the binary and the driver are given explicitly, so Selenium Manager
is not consulted. The fake microphone plays a WAV file (Chromium loops it).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) from PATH, or None when either package is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def options(browser: str, profile: Path, microphone_wav: Path) -> webdriver.ChromeOptions:
    """Headless, offline-quiet, with a fake camera/mic whose audio is `microphone_wav`."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone_wav}",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return opts


@contextlib.contextmanager
def chromium(
    paths: tuple[str, str], profile: Path, microphone_wav: Path, log: Path
) -> Iterator[webdriver.Chrome]:
    """A headless Chromium session, quit afterwards."""
    browser, driver_path = paths
    service = Service(executable_path=driver_path, log_output=str(log))
    driver = webdriver.Chrome(options=options(browser, profile, microphone_wav), service=service)
    try:
        yield driver
    finally:
        driver.quit()


def console(driver: webdriver.Chrome) -> str:
    """The page's console messages so far, one a line."""
    return "\n".join(f"{entry['level']} {entry['message']}" for entry in driver.get_log("browser"))

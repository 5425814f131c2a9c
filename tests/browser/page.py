"""What the test asks the client page: its peer connections' inbound audio, via getStats()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selenium import webdriver

#: Runs before the page's own scripts: keeps every RTCPeerConnection the page creates.
RECORD_PEER_CONNECTIONS = """
(() => {
  const Native = window.RTCPeerConnection;
  window.__peerConnections = [];
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...args);
    window.__peerConnections.push(pc);
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
  Object.setPrototypeOf(window.RTCPeerConnection, Native);
})();
"""

#: The inbound audio of every recorded connection, plus the <audio> elements' live tracks.
INBOUND_AUDIO = """
const done = arguments[arguments.length - 1];
(async () => {
  const rtp = [];
  for (const pc of window.__peerConnections || []) {
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'audio') {
        rtp.push({
          state: pc.connectionState,
          bytes: s.bytesReceived || 0,
          energy: s.totalAudioEnergy || 0,
          level: s.audioLevel || 0,
        });
      }
    });
  }
  const tracks = [];
  for (const el of document.querySelectorAll('audio')) {
    const stream = el.srcObject;
    if (stream) {
      for (const t of stream.getAudioTracks()) tracks.push(t.readyState);
    }
  }
  return {connections: (window.__peerConnections || []).length, rtp, tracks};
})().then(done, (e) => done({error: String(e)}));
"""


@dataclass(frozen=True)
class InboundAudio:
    """The bot's audio as the browser has received it so far."""

    connections: int
    states: tuple[str, ...]
    bytes_received: int
    audio_energy: float
    live_tracks: int

    def __str__(self) -> str:
        return (
            f"{self.connections} peer connection(s) {list(self.states)}, "
            f"{self.bytes_received} audio bytes received, "
            f"total audio energy {self.audio_energy:.4f}, {self.live_tracks} live <audio> track(s)"
        )


def record_peer_connections(driver: webdriver.Chrome) -> None:
    """Install the recorder on every document this tab loads from now on."""
    driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_PEER_CONNECTIONS}
    )


def inbound_audio(driver: webdriver.Chrome) -> InboundAudio:
    """Sum of the inbound audio RTP statistics of the page's peer connections."""
    raw: dict[str, Any] = driver.execute_async_script(INBOUND_AUDIO)
    if "error" in raw:
        raise RuntimeError(f"getStats() failed in the page: {raw['error']}")
    rtp = raw["rtp"]
    return InboundAudio(
        connections=raw["connections"],
        states=tuple(entry["state"] for entry in rtp),
        bytes_received=sum(int(entry["bytes"]) for entry in rtp),
        audio_energy=sum(float(entry["energy"]) for entry in rtp),
        live_tracks=sum(1 for state in raw["tracks"] if state == "live"),
    )


#: What the client page shows: the transcript's lines and the stage timings of each turn.
PAGE_VIEW = """
const lines = [...document.querySelectorAll('#conversation li')].map((li) => ({
  who: li.classList.contains('user') ? 'user' : 'bot',
  final: li.classList.contains('final'),
  text: li.textContent,
}));
const turns = [...document.querySelectorAll('#turns tbody tr.turn')].map((row) => {
  const ms = {};
  row.querySelectorAll('td[data-stage]').forEach((cell) => {
    if (cell.dataset.ms !== undefined) ms[cell.dataset.stage] = Number(cell.dataset.ms);
  });
  return ms;
});
const p50 = [...document.querySelectorAll('#p50 td[data-stage]')].map((c) => c.textContent);
return {lines, turns, p50, state: document.getElementById('state').textContent,
        error: document.getElementById('error').textContent};
"""


@dataclass(frozen=True)
class PageView:
    """The transcript, the per-turn stage timings (ms by stage) and the state the page shows."""

    user_finals: tuple[str, ...]
    bot_lines: tuple[str, ...]
    turns: tuple[dict[str, float], ...]
    p50: tuple[str, ...]
    state: str
    error: str

    def timed_turns(self, stages: tuple[str, ...]) -> list[dict[str, float]]:
        """The turns that show a number for every one of `stages`."""
        return [turn for turn in self.turns if all(stage in turn for stage in stages)]

    def __str__(self) -> str:
        return (
            f"state {self.state!r}, error {self.error!r}, user finals {list(self.user_finals)}, "
            f"bot lines {list(self.bot_lines)}, turns {list(self.turns)}, p50 {list(self.p50)}"
        )


def page_view(driver: webdriver.Chrome) -> PageView:
    """What the client page shows now."""
    raw: dict[str, Any] = driver.execute_script(PAGE_VIEW)
    lines = raw["lines"]
    return PageView(
        user_finals=tuple(ln["text"] for ln in lines if ln["who"] == "user" and ln["final"]),
        bot_lines=tuple(ln["text"] for ln in lines if ln["who"] == "bot" and ln["text"].strip()),
        turns=tuple({k: float(v) for k, v in turn.items()} for turn in raw["turns"]),
        p50=tuple(raw["p50"]),
        state=raw["state"],
        error=raw["error"],
    )

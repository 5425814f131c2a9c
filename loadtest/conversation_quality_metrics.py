"""The conversation benchmark's measurements, the figures made of them, and the printed table.

Every measurement is kept (the JSON has them all); the figures are what the issue's targets name:
barge-in latency p50/p95 and misses, false barge-ins per 10 minutes of bot speech at each echo
level, backchannels that stopped the bot, context accuracy, turn-end latency and premature turn
ends.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.stats import percentile, table
from loadtest.testset import normalize, word_errors

#: A barge-in that has not stopped the bot's audio this long after the user started is missed.
MISSED_AFTER_S = 2.0
#: Context accuracy's tolerance: stored and played replies may differ by this many words (as
#: written: `written_words`).
WORD_TOLERANCE = 1


@dataclass
class BargeIn:
    """One interruption of a long reply by a real utterance."""

    at_s: float  # how far into the reply's audio the user started speaking
    latency_ms: float | None  # user speech start -> the bot's audio stopped; None: missed
    generated_words: int  # words (as written) of the reply generated before the interruption
    stored_words: int  # words (as written) of the assistant message in the bot's context
    played_words_asr: int  # words (as written) played, from the ASR transcript of its audio
    played_s: float  # seconds of the reply's audio played
    accurate: bool | None  # stored within WORD_TOLERANCE of played; None: nothing to compare
    yielded: bool = True  # the bot interrupted its reply (else there is no cut to judge)


@dataclass
class Backchannel:
    """A backchannel said while the bot spoke."""

    word: str
    stopped: bool  # an interruption reached the speaker within MISSED_AFTER_S: reply abandoned
    paused: bool = False  # not stopped, but the audio paused (a silence) within MISSED_AFTER_S


@dataclass
class EchoRun:
    """The bot talking with its own voice fed back at `echo_db` and no user speech."""

    echo_db: float | None
    bot_speech_s: float = 0.0
    false_barge_ins: int = 0  # interruptions that reached the speaker
    user_turns: int = 0  # user turns the VAD or turn detection started on the echo
    replies: int = 0
    stalls: int = 0  # pipelines that ended early (the bot stalled until Pipecat's idle timeout)
    audio_gaps: int = 0  # silences mid-reply shorter than a reply's end (pauses, TTS underruns)

    @property
    def per_10_min(self) -> float:
        """False barge-ins per 10 minutes of bot speech."""
        return 600 * self.false_barge_ins / self.bot_speech_s if self.bot_speech_s else math.nan


@dataclass
class TurnEnd:
    """A user turn: its end, and when the bot first answered."""

    kind: str  # "question" or "paused"
    pause_s: float  # the pause inside the turn (0 for none)
    latency_ms: float | None  # user speech end -> the bot's first audio after it
    premature: bool  # a reply started before the user's speech ended


@dataclass
class Measurements:
    """Everything one run measured."""

    barge_ins: list[BargeIn] = field(default_factory=list)
    not_interruptible: int = 0  # replies that ended before the scripted interruption
    backchannels: list[Backchannel] = field(default_factory=list)
    echo: list[EchoRun] = field(default_factory=list)
    turns: list[TurnEnd] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # repetitions that could not finish


def played_prefix(generated: list[str], heard: list[str]) -> int:
    """How many of the `generated` words the `heard` transcript covers (best-aligned prefix).

    `generated` may be words as written (`written_words`): each is compared as the words it is
    spoken as. A tie goes to the longer prefix: a word the ASR mangles (a number, a name) costs
    as much left out as taken in, and the heard words after it show that it was played.
    """
    best, best_errors = 0, math.inf
    for k in range(len(generated) + 1):
        errors, _ = word_errors(" ".join(generated[:k]), " ".join(heard))
        if errors <= best_errors:
            best, best_errors = k, errors
    return best


def words(text: str) -> list[str]:
    """Words as the benchmark compares them (the test set's normalisation)."""
    return normalize(text)


def written_words(text: str) -> list[str]:
    """Words as written, the unit of context accuracy.

    A number is one word however many it is spoken as: "1879" is six words spoken, and an ASR
    hears it as anything from one to six ("18s").
    """
    return [token for token in text.split() if words(token)]


def _ms(samples: list[float], q: float) -> float | None:
    return round(percentile(samples, q), 1) if samples else None


def figures(m: Measurements) -> dict[str, object]:
    """The headline figures of `m`."""
    latencies = [b.latency_ms for b in m.barge_ins if b.latency_ms is not None]
    judged = [b for b in m.barge_ins if b.accurate is not None]
    turn_ms = [t.latency_ms for t in m.turns if t.latency_ms is not None]
    echo: dict[str, object] = {}
    for run in m.echo:
        echo[_level(run.echo_db)] = {
            "bot_speech_min": round(run.bot_speech_s / 60, 2),
            "false_barge_ins": run.false_barge_ins,
            "per_10_min": round(run.per_10_min, 2) if run.bot_speech_s else None,
            "user_turns_started": run.user_turns,
            "audio_gaps": run.audio_gaps,
            "stalls": run.stalls,
        }
    return {
        "barge_in_ms_p50": _ms(latencies, 50),
        "barge_in_ms_p95": _ms(latencies, 95),
        "barge_ins": len(m.barge_ins),
        "missed_barge_ins": sum(b.latency_ms is None for b in m.barge_ins),
        "not_interruptible": m.not_interruptible,
        "false_barge_ins": echo,
        "backchannel_stops": sum(b.stopped for b in m.backchannels),
        "backchannel_pauses": sum(b.paused for b in m.backchannels),
        "backchannels": len(m.backchannels),
        "context_accurate": sum(bool(b.accurate) for b in judged),
        "context_judged": len(judged),
        "context_accuracy_pct": (
            round(100 * sum(bool(b.accurate) for b in judged) / len(judged), 1) if judged else None
        ),
        "turn_end_ms_p50": _ms(turn_ms, 50),
        "turn_end_ms_p95": _ms(turn_ms, 95),
        "turns": len(m.turns),
        "premature_turn_ends": sum(t.premature for t in m.turns),
        "paused_turns": sum(t.kind == "paused" for t in m.turns),
        "failures": len(m.failures),
    }


def _level(echo_db: float | None) -> str:
    return "none" if echo_db is None else f"{echo_db:g} dB"


def report(summary: dict[str, object]) -> str:
    """The printed table of `figures(...)`."""
    rows: list[list[object]] = [
        ["barge-in p50 / p95 (ms)", f"{summary['barge_in_ms_p50']} / {summary['barge_in_ms_p95']}"],
        ["missed barge-ins", f"{summary['missed_barge_ins']} of {summary['barge_ins']}"],
    ]
    echo = summary["false_barge_ins"]
    assert isinstance(echo, dict)
    for level, run in echo.items():
        rows.append(
            [
                f"false barge-ins, echo {level}",
                f"{run['false_barge_ins']} in {run['bot_speech_min']} min "
                f"= {run['per_10_min']} per 10 min",
            ]
        )
    rows += [
        [
            "backchannels that stopped the bot",
            f"{summary['backchannel_stops']} of {summary['backchannels']} "
            f"(+{summary['backchannel_pauses']} paused it)",
        ],
        [
            "context accuracy",
            f"{summary['context_accuracy_pct']} % "
            f"({summary['context_accurate']} of {summary['context_judged']})",
        ],
        [
            "turn-end latency p50 / p95 (ms)",
            f"{summary['turn_end_ms_p50']} / {summary['turn_end_ms_p95']}",
        ],
        [
            "premature turn ends",
            f"{summary['premature_turn_ends']} of {summary['turns']} "
            f"({summary['paused_turns']} with a pause inside)",
        ],
    ]
    return table(rows, ["measure", "value"])


def write_json(path: Path, run: dict[str, object], m: Measurements) -> None:
    """The run's settings, figures and every measurement, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**run, "figures": figures(m), "measurements": asdict(m)}
    path.write_text(json.dumps(data, indent=1, default=str))

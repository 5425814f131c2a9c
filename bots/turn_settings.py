"""Turn-taking settings of a bot: endpointing, barge-in, echo; flags and environment variables.

`TurnSettings` is the one place that lists them. Each field is a flag of `python -m bots.<name>`
and `nemotron-speech bot <name>` (`--vad-stop-s 0.3`) and an environment variable
(`NEMOTRON_BOT_VAD_STOP_S=0.3`); a flag wins over the variable, the variable over the bot's own
default. Each bot sets the defaults it was tuned for (`BotConfig.turn`).

Endpointing (when the user's turn ends):
    vad_stop_s, vad_start_s, vad_confidence, vad_min_volume: Silero's `VADParams`: seconds of
        silence before the VAD says the user stopped, seconds of speech before it says they
        started, the voice confidence and the volume below which a frame is silence. The start
        is quicker than Pipecat's (0.1 s, 0.6, 0.3 against 0.2 s, 0.7, 0.6): the user's speech
        pauses the bot 110-140 ms after its onset instead of 310-560 ms (the test set's voices),
        and a start that was no barge-in only pauses the bot (see below). Where the bot cancels
        its own echo (a loudspeaker), a barge-in must also pass Pipecat's thresholds
        (`echo_vad_floor`).
    smart_turn: SmartTurn v3 judges at each VAD pause whether the user is done; off: the VAD
        stop ends the turn.
    smart_turn_stop_s: SmartTurn's own fallback: this much silence ends the turn whatever the
        model says.
    user_idle_s: when the bot has finished speaking and the user stays silent this long, the bot
        asks once, briefly, whether they are still there (0: never).

Barge-in (when the user's speech stops the bot; see `bots.barge_in`):
    barge_in_min_words: words the user must say (not counting backchannels or the bot's own
        words heard back) before the bot yields while it speaks.
    barge_in_min_word_confidence: a word counts for `barge_in_min_words` only if the ASR is
        this sure of it (its word confidence, 0..1): Whisper tiny makes words of backchannels
        and noise ("mm-hm" -> "Bumble.", 0.4) that it is rarely sure of. 0: every word counts.
    barge_in_min_s: seconds the user must have spoken (by the VAD, less its stop time) before
        the bot yields while it speaks. Both rules must hold; with both at 0 the VAD's start
        stops the bot at once, as Pipecat does by default. By default one word and 0.6 s:
        backchannels and echo never stop the bot, and a hum ("mm-hm", 0.3-0.6 s), of which a
        small ASR makes confident words ("C'mon", "I'm done"), does not either; with
        `resume_after_false_interruption` the barge-in is as quick as the VAD all the same.
    barge_in_commands: phrases that stop the bot however short the speech ("stop", "wait"...),
        unless they are the bot's own words heard back; compared without case or punctuation,
        whatever the ASR's confidence in them.
    backchannels: phrases that never stop the bot ("mm-hm", "yeah"...), compared without case
        or punctuation.
    resume_after_false_interruption: with the barge-in rules on, the bot's audio pauses as
        soon as the VAD hears the user (low barge-in latency) and resumes where it paused if the
        speech turns out to be noise, a backchannel or its own echo. Off: the bot speaks on
        until words confirm the barge-in (a false one never stops it).
    false_interruption_timeout_s: how long the bot stays paused waiting for words that confirm
        the interruption; then it resumes (words that come later still interrupt it).
    echo_transcript_filter: user words that repeat what the bot is saying right now are taken
        for its own voice heard back, not for the user's.
    echo_cancellation: "webrtc": WebRTC's acoustic echo canceller on the microphone, with the
        audio the bot hands its speaker as the reference (`bots.echo`); "off"; or "auto" (the
        default): webrtc where the transport's microphone hears its loudspeaker (Pipecat's local
        audio transport, the benchmark's loopback), off where the client cancels echo itself
        (the browser client over WebRTC, Daily) or there is no room (WAV files). Turn it off for
        a headset: with no echo to learn from, the canceller also mutes the user's speech while
        the bot talks, and barge-ins are missed.
    echo_vad_floor: where the bot cancels its own echo, a barge-in is confirmed only on speech
        that also passed Pipecat's VAD thresholds (`bots.echo_floor.ECHO_FLOOR`: confidence 0.7
        and volume 0.6 for 0.2 s): the canceller's residual passes the quick ones now and then,
        and Whisper makes words of it. The bot still pauses on the quick start (with
        `resume_after_false_interruption`), so the floor does not delay the pause; without the
        barge-in rules the floor holds the VAD's start instead. Off: a false barge-in from the
        bot's own voice every few minutes (the README's conversation quality figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "NEMOTRON_BOT_"

#: The echo cancellers `echo_cancellation` may name ("off" turns it off, "auto" chooses by the
#: transport: `bots.echo.wants_echo_cancellation`).
ECHO_CANCELLERS = ("auto", "off", "webrtc")

DEFAULT_BACKCHANNELS = (
    "mm-hm",
    "mhm",
    "mhmm",
    "mm",
    "mmm",
    "hm",
    "hmm",
    "uh",
    "um",
    "oh",
    "ah",
    "uh-huh",
    "yeah",
    "yes",
    "yep",
    "right",
    "okay",
    "ok",
    "sure",
    "i see",
    "got it",
    # An acknowledgement, and Whisper's stock hallucination on a hum or a breath.
    "thank you",
    "thanks",
)


#: Short phrases that stop the bot at once (`barge_in_commands`).
DEFAULT_COMMANDS = (
    "stop",
    "wait",
    "hold on",
    "hang on",
    "pause",
    "sorry",
    "excuse me",
    "quiet",
    "shut up",
    "enough",
)


class TurnSettingsError(ValueError):
    """A flag or variable whose value does not fit its setting; the message names it."""


@dataclass(frozen=True)
class TurnSettings:
    """When the user's turn starts and ends, what stops the bot, and what cancels its echo."""

    vad_stop_s: float = 0.2
    vad_start_s: float = 0.1
    vad_confidence: float = 0.6
    vad_min_volume: float = 0.3
    smart_turn: bool = True
    smart_turn_stop_s: float = 3.0
    user_idle_s: float = 0.0
    barge_in_min_words: int = 1
    barge_in_min_word_confidence: float = 0.5
    barge_in_min_s: float = 0.6
    barge_in_commands: tuple[str, ...] = DEFAULT_COMMANDS
    backchannels: tuple[str, ...] = DEFAULT_BACKCHANNELS
    resume_after_false_interruption: bool = True
    false_interruption_timeout_s: float = 1.5
    echo_transcript_filter: bool = True
    echo_cancellation: str = "auto"
    echo_vad_floor: bool = True

    def __post_init__(self) -> None:
        """Refuse values no bot could run with, naming the setting."""
        for name in ("vad_stop_s", "vad_start_s", "smart_turn_stop_s", "user_idle_s"):
            _at_least(name, getattr(self, name), 0.0)
        _at_least("barge_in_min_s", self.barge_in_min_s, 0.0)
        _at_least("barge_in_min_words", self.barge_in_min_words, 0)
        _at_least("false_interruption_timeout_s", self.false_interruption_timeout_s, 0.0)
        for name in ("vad_confidence", "vad_min_volume", "barge_in_min_word_confidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise TurnSettingsError(f"{name} must lie in 0..1, not {value}")
        if self.echo_cancellation not in ECHO_CANCELLERS:
            raise TurnSettingsError(
                f"echo_cancellation must be one of {', '.join(ECHO_CANCELLERS)}, "
                f"not {self.echo_cancellation!r}"
            )

    @property
    def barge_in_gated(self) -> bool:
        """Whether user speech must pass the barge-in rules before it stops the bot."""
        return self.barge_in_min_words > 0 or self.barge_in_min_s > 0

    def with_environment(self, env: Mapping[str, str] | None = None) -> TurnSettings:
        """These settings with the NEMOTRON_BOT_* variables of `env` (default os.environ)."""
        env = os.environ if env is None else env
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            name = env_name(field.name)
            if name in env:
                changes[field.name] = _parse(name, env[name], getattr(self, field.name))
        try:
            return dataclasses.replace(self, **changes)
        except TurnSettingsError as err:
            raise TurnSettingsError(f"{err} (from the NEMOTRON_BOT_* variables)") from None


def env_name(field: str) -> str:
    """The environment variable of setting `field`."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line flag of setting `field`."""
    return "--" + field.replace("_", "-")


def add_turn_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting to `parser` (none has a default: unset keeps the variable's)."""
    group = parser.add_argument_group(
        "turn-taking", f"endpointing, barge-in and echo; each flag also reads {ENV_PREFIX}<NAME>"
    )
    for field in dataclasses.fields(TurnSettings):
        group.add_argument(
            flag_name(field.name),
            dest=f"turn_{field.name}",
            metavar="VALUE",
            default=None,
            help=f"(${env_name(field.name)})",
        )


def flags_to_environment(argv: Sequence[str], env: MutableMapping[str, str]) -> list[str]:
    """Move the turn flags of `argv` into `env` (checked); returns the other arguments.

    A bot runs under Pipecat's runner, which parses the command line itself; the turn flags
    are taken out first and travel as the variables they stand for, so that a flag wins.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_turn_flags(parser)
    known, rest = parser.parse_known_args(list(argv))
    defaults = TurnSettings()
    for field in dataclasses.fields(TurnSettings):
        value = getattr(known, f"turn_{field.name}")
        if value is not None:
            _parse(flag_name(field.name), value, getattr(defaults, field.name))
            env[env_name(field.name)] = value
    return rest


def _parse(name: str, text: str, like: object) -> object:
    """`text` as the type of `like` (the setting's current value); errors name `name`."""
    text = text.strip()
    try:
        if isinstance(like, bool):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, tuple):
            return tuple(p.strip().lower() for p in text.split(",") if p.strip())
    except ValueError as err:
        raise TurnSettingsError(f"{name}={text!r}: {err}") from None
    return text


def _at_least(name: str, value: float, least: float) -> None:
    if value < least:
        raise TurnSettingsError(f"{name} must be at least {least:g}, not {value}")


def describe(settings: TurnSettings | None = None) -> str:
    """One line per setting: its flag, its variable and its value in `settings`."""
    settings = settings or TurnSettings()
    lines = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        shown = ",".join(value) if isinstance(value, tuple) else value
        lines.append(f"{flag_name(field.name):36} ${env_name(field.name):44} {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe(TurnSettings().with_environment()))

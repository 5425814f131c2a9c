"""The conversation benchmark's scripts: what the user says, in which voice, and when.

The user speaks with the test set's voices (`loadtest.testset`): espeak-ng's en-us voice for
questions and answers, its en-gb voice for the backchannels ("mm-hm", "yeah", "right", "okay"), so
neither sounds like the bot (Piper's joe, the only voice our Piper server has). Without espeak-ng
the user falls back to the test set's slow Piper joe style and says so in the report.

"mm-hm" is a hum: espeak-ng spells the written word out as letters ("em em aitch em", four
syllables, 0.8 s), which no listener says, so the benchmark gives espeak its phonemes
(`HUMS`) and brings the hum up to the level of the user's voice (espeak's nasals are about
8 dB quieter than its vowels; a louder hum is the harder case for the VAD and the ASR).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from loadtest.testset import espeak_speech, has_espeak, piper_speech
from services.runtime.audio import FloatAudio, float_to_pcm16, pcm16_to_float

RATE = 16000
WINDOW = RATE // 100  # 10 ms

#: Asks the LLM for long replies, so that there is something to interrupt.
STORYTELLER_PROMPT = (
    "You are a storyteller running privately on the user's own machine. Whatever you are asked, "
    "answer at length: several paragraphs of plain spoken sentences, with no lists and no "
    "markdown."
)

#: Questions whose replies are long (scenarios: barge-in, backchannels, echo).
STORY_QUESTIONS = (
    "Tell me a long story about a brave little dog.",
    "Tell me a long story about a lighthouse keeper and a storm.",
    "Tell me a long story about a dragon who lives in the mountains.",
    "Tell me a long story about a girl who builds a robot.",
    "Tell me a long story about two friends lost in a forest.",
    "Tell me a long story about a sailor looking for an island.",
)

#: What the user interrupts with: real questions of the test set, several words long.
INTERRUPTIONS = (
    "What is the capital of Australia?",
    "How many calories are in an apple?",
    "Which planet is closest to the sun?",
    "How long should I boil an egg?",
    "What time does the pharmacy close on Sunday?",
    "How far is it from Berlin to Munich by train?",
)

BACKCHANNELS = ("mm-hm", "yeah", "right", "okay")

#: Backchannels that are hums, as espeak-ng phonemes: two syllabic m's, the second after an h.
HUMS = {"mm-hm": "[[,m-m-'hm-]]"}
#: The user's voice's level (RMS of its 10 ms windows that pass `speech_bounds`' threshold)
#: that a hum is brought to.
USER_LEVEL_QUESTION = "What is the capital of Australia?"

#: Turns with a pause inside: (before the pause, after it); the pause is mid-sentence.
PAUSED_TURNS = (
    ("I would like to order a large pizza", "with mushrooms and olives."),
    ("Remind me to call my sister", "when I get home from work."),
    ("Schedule a meeting with the design team", "next Tuesday afternoon."),
    ("Find me a quiet coffee shop", "near the train station."),
)

#: The pauses inside those turns, in rotation (seconds).
PAUSES_S = (0.6, 0.75, 0.9)


@dataclass(frozen=True)
class Speech:
    """A scripted utterance as 16 kHz LINEAR16, and where its speech starts and ends in it."""

    text: str
    pcm: bytes
    onset_s: float
    offset_s: float

    @property
    def duration_s(self) -> float:
        """Length of the audio, silence included."""
        return len(self.pcm) / 2 / RATE


def speech_bounds(audio: FloatAudio, threshold: float = 0.02) -> tuple[float, float]:
    """(first, last) moment in seconds where 10 ms windows pass `threshold` RMS."""
    loud = np.flatnonzero(_window_rms(audio) > threshold)
    if loud.size == 0:
        raise ValueError("the synthesized utterance is silent")
    return loud[0] * WINDOW / RATE, (loud[-1] + 1) * WINDOW / RATE


def speech_level(audio: FloatAudio, threshold: float = 0.02) -> float:
    """RMS of the 10 ms windows of `audio` that pass `threshold` (its speech, not its silence)."""
    rms = _window_rms(audio)
    loud = rms[rms > threshold]
    if loud.size == 0:
        raise ValueError("the synthesized utterance is silent")
    return float(np.sqrt(np.mean(loud**2)))


def _window_rms(audio: FloatAudio) -> FloatAudio:
    usable = audio[: audio.size // WINDOW * WINDOW].reshape(-1, WINDOW)
    return np.sqrt(np.mean(usable**2, axis=1))


def _speech(text: str, audio: FloatAudio) -> Speech:
    onset, offset = speech_bounds(audio)
    return Speech(text, float_to_pcm16(audio), onset, offset)


def user_voice() -> str:
    """The user's voice, as the report names it."""
    return "espeak-ng en-us 165 wpm" if has_espeak() else "piper joe (length scale 1.2)"


def backchannel_voice() -> str:
    """The backchannels' voice, as the report names it."""
    return "espeak-ng en-gb 150 wpm" if has_espeak() else "piper joe (length scale 0.85)"


@cache
def say(text: str) -> Speech:
    """`text` in the user's voice."""
    if has_espeak():
        return _speech(text, espeak_speech(text, "en-us", 165))
    return _speech(text, piper_speech(text, length_scale=1.2, noise_scale=0.5))


@cache
def backchannel(word: str) -> Speech:
    """A backchannel in its own voice."""
    if has_espeak():
        if word in HUMS:
            hum = espeak_speech(HUMS[word], "en-gb", 150)
            user = pcm16_to_float(say(USER_LEVEL_QUESTION).pcm)
            return _speech(word, np.clip(hum * speech_level(user) / speech_level(hum), -1, 1))
        return _speech(word, espeak_speech(word, "en-gb", 150))
    return _speech(word, piper_speech(word, length_scale=0.85, noise_scale=0.5))


@cache
def paused_turn(index: int) -> tuple[Speech, Speech, float]:
    """The `index`-th turn with a pause inside: its two halves and the pause between them.

    The pause is counted from the end of the first half's speech to the start of the second's;
    the silence synthesized around each half is trimmed to make it so.
    """
    first, second = PAUSED_TURNS[index % len(PAUSED_TURNS)]
    pause = PAUSES_S[index % len(PAUSES_S)]
    head, tail = say(first), say(second)
    head = _trimmed(head, after=pause)
    tail = _trimmed(tail, after=0.0)
    return head, tail, pause


def _trimmed(speech: Speech, after: float) -> Speech:
    """`speech` from its onset to its offset, then `after` seconds of silence."""
    start, end = round(speech.onset_s * RATE) * 2, round(speech.offset_s * RATE) * 2
    pcm = speech.pcm[start:end] + bytes(round(after * RATE) * 2)
    return Speech(speech.text, pcm, 0.0, speech.offset_s - speech.onset_s)

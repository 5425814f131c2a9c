"""Whisper on the CPU through faster-whisper (CTranslate2, int8): the default ASR backend.

Whisper is not a streaming model, so a stream re-decodes its growing utterance. The cadence adapts
to load by construction: a stream has at most one interim decode queued or running, and when it ends
the next one takes all the audio that arrived meanwhile (a decode is skipped, the stream never falls
behind). All streams share one decode thread (`DecodePool`), where the decode that answers a
finalize jumps ahead of every interim one.

A finalize is answered by a decode of the whole utterance, never by an interim one: an interim
decode hears the speech cut wherever its turn came, and Whisper drops a last word that the audio
stops too soon after ("... home from work" -> "... home"). The final decode hears a fixed form of
the utterance (`UtteranceAudio.final_snapshot`): its audio up to 150 ms past the last voiced
frame, then digital silence up to `FINAL_SILENCE_S` past it, however long the client waited. So
the decode can start as soon as the speaker pauses for 150 ms, on the idle CPU while the client's
VAD waits out its end-of-turn silence, and a finalize during that pause reuses it: it is the very
decode the finalize would run (same audio, same text as at once). If the speaker goes on, that
decode is dropped and the next pause starts another; a finalize that comes before a pause, or
after new speech, waits for a fresh one. An utterance whose audio never rose above the energy
gate is answered with empty text without a decode (Whisper would otherwise hallucinate "you" on
silence). A final decode jumps ahead of every interim one on the decode thread, and an interim
decode of the stream still in line is dropped at a finalize, so a finalize never waits behind
other streams' interim decodes. Decodes use an encoder window sized to the utterance
(`whisper_window`), not 30 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np

from services.asr.backend import (
    AsrBackend,
    AudioEvent,
    FinalizeEvent,
    Hypothesis,
    RecognizedWord,
    RecognizerEvent,
    StreamOptions,
)
from services.asr.backends.decode_pool import DecodePool, Priority
from services.asr.backends.utterance import SETTLE_S, UtteranceAudio
from services.asr.backends.whisper_models import WhisperWeights, resolve_weights
from services.asr.backends.whisper_window import WindowedDecoder, spaced_words
from services.asr.settings import AsrSettings
from services.runtime.audio import FloatAudio
from services.runtime.streams import StreamQueue

try:
    from faster_whisper import WhisperModel  # type: ignore[import-untyped]
    from faster_whisper.tokenizer import (  # type: ignore[import-untyped]
        _LANGUAGE_CODES as WHISPER_LANGUAGES,
    )
except ImportError as err:  # pragma: no cover - a core dependency
    raise ImportError(
        "the whisper backend needs faster-whisper: pip install nemotron-speech-mesh"
    ) from err

log = logging.getLogger(__name__)
# faster-whisper logs every call at INFO ("Processing audio with duration ..."): noise in ours.
logging.getLogger("faster_whisper").setLevel(logging.WARNING)

SAMPLE_RATE = 16000
#: New audio an utterance needs before another interim decode is worth its CPU.
INTERIM_STEP_S = 0.25
#: A final decode hears the utterance up to SETTLE_S past its last voiced frame, then digital
#: silence up to this far past it: Whisper drops a last word whose audio stops too soon after it
#: ("... home from work" -> "... home"), and the silence must not depend on when the client
#: finalized, so that the decode started at the pause is the very one a finalize would run.
FINAL_SILENCE_S = 0.6
#: No interim decode starts after this much silence: the speaker may be done, and an interim
#: decode on the thread when the pause reaches SETTLE_S would delay the end decode by its length.
INTERIM_QUIET_S = 0.06
#: Stability of interim results: Whisper may rewrite any word until the final decode.
INTERIM_STABILITY = 0.5
#: Whisper's no-speech rule: a segment is dropped when the model thinks it is not speech.
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0


@dataclass(frozen=True)
class _Decoded:
    text: str
    samples: int  # how much of the utterance the text covers
    words: tuple[RecognizedWord, ...] = ()  # when the stream asked for word times


class WhisperAsrBackend(AsrBackend):
    """Whisper (tiny.en by default) on CTranslate2, re-decoding each utterance as it grows."""

    name = "whisper"
    word_timestamps = True

    def __init__(
        self,
        weights: WhisperWeights,
        cpu_threads: int = 0,
        beam_size: int = 1,
        device: str = "auto",
        max_utterance_s: float = 30.0,
        encoder_window: str = "auto",
    ) -> None:
        self.weights = weights
        self.encoder_window = encoder_window
        self.cpu_threads = cpu_threads or min(os.cpu_count() or 1, 8)
        self.beam_size = beam_size
        self.device = device
        self.max_utterance_s = max_utterance_s
        self._model: WhisperModel | None = None
        self._pool: DecodePool[_Decoded] | None = None
        self._windowed: WindowedDecoder | None = None
        self._languages: tuple[str, ...] = ("en",)

    @classmethod
    def from_settings(cls, settings: AsrSettings) -> Self:
        """Whisper weights named by `settings.model`; fails early if they are not installed."""
        return cls(
            resolve_weights(settings.model),
            cpu_threads=settings.cpu_threads,
            beam_size=settings.beam_size,
            device=settings.device,
            max_utterance_s=settings.max_utterance_s,
            encoder_window=settings.encoder_window,
        )

    @property
    def model_name(self) -> str:
        """E.g. "whisper-tiny.en"."""
        return self.weights.name

    @property
    def languages(self) -> Sequence[str]:
        """English for the .en models; Whisper's languages (English first) otherwise."""
        return self._languages

    async def load(self) -> None:
        """Load the weights and decode a second of audio so the first stream is not slow."""
        model = await asyncio.to_thread(self._load_model)
        self._model = model
        if self.encoder_window == "auto":
            self._windowed = WindowedDecoder(
                model, self.beam_size, NO_SPEECH_THRESHOLD, LOG_PROB_THRESHOLD
            )
        if model.model.is_multilingual:
            self._languages = ("en", *(code for code in WHISPER_LANGUAGES if code != "en"))
        self._pool = DecodePool("whisper")
        t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
        warm_up = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        await self._pool.run(Priority.FINAL, lambda: lambda: self._decode(warm_up, "en"))
        log.info(
            "%s loaded (%d threads, beam %d, %s encoder window)",
            self.model_name,
            self.cpu_threads,
            self.beam_size,
            self.encoder_window,
        )

    async def aclose(self) -> None:
        """Stop the decode thread and release the model."""
        if self._pool is not None:
            self._pool.close()
        self._pool = None
        self._model = None
        self._windowed = None

    def recognize(
        self, options: StreamOptions, events: StreamQueue[RecognizerEvent]
    ) -> AsyncGenerator[Hypothesis, None]:
        """Re-decode the growing utterance for interims; one decode (or none) per finalize."""
        return _WhisperStream(self, options).run(events)

    async def decode(
        self,
        priority: Priority,
        snapshot: Callable[[], FloatAudio],
        language: str,
        words: bool = False,
    ) -> _Decoded:
        """Decode the audio that `snapshot()` returns once the shared decode thread is free.

        With `words`, the result carries its words' times (an alignment pass after the decode).
        """
        if self._pool is None:
            raise RuntimeError("the whisper backend is not loaded")

        def job() -> Callable[[], _Decoded]:
            audio = snapshot()
            return lambda: self._decode(audio, language, words)

        return await self._pool.run(priority, job)

    def _load_model(self) -> WhisperModel:
        folder = self.weights.materialize()
        device = self.device
        if device == "auto":
            device = "cpu"  # the embedded default; --device cuda opts into the GPU
        return WhisperModel(
            str(folder),
            device=device,
            compute_type="int8" if device == "cpu" else "default",
            cpu_threads=self.cpu_threads,
            num_workers=1,
            local_files_only=True,
        )

    def _decode(self, audio: FloatAudio, language: str, words: bool = False) -> _Decoded:
        """Blocking: the text of `audio`, greedy and without Whisper's slow fallbacks."""
        assert self._model is not None
        if self._windowed is not None and self._windowed.fits(audio):
            text, timed = self._windowed.decode_words(audio, language, with_words=words)
            return _Decoded(text, audio.size, tuple(timed))
        segments, _ = self._model.transcribe(
            audio,
            language=language,
            beam_size=self.beam_size,
            temperature=0.0,  # no temperature fallback: one decode per call
            condition_on_previous_text=False,
            without_timestamps=True,
            no_speech_threshold=NO_SPEECH_THRESHOLD,
            log_prob_threshold=LOG_PROB_THRESHOLD,
            vad_filter=False,  # the energy gate and the no-speech rule handle silence
            word_timestamps=words,
            # No punctuation merging: `spaced_words` joins pieces into the words of the text.
            prepend_punctuations="",
            append_punctuations="",
        )
        segments = list(segments)
        text = " ".join(segment.text.strip() for segment in segments).strip()
        # Each segment's first word starts a word, whatever its spacing.
        timed = spaced_words(
            (f" {w.word.lstrip()}" if i == 0 else w.word, w.start, w.end, w.probability)
            for segment in segments
            for i, w in enumerate(segment.words or ())
        )
        return _Decoded(text, audio.size, tuple(timed))


class _WhisperStream:
    """The recognizer of one stream: its utterance, its latest text, its interim and end decodes."""

    def __init__(self, backend: WhisperAsrBackend, options: StreamOptions) -> None:
        self.backend = backend
        self.options = options
        # The servicer cuts utterances at max_utterance_s; a second more holds the resampler tail.
        self.audio = UtteranceAudio(backend.max_utterance_s + 1.0, SAMPLE_RATE)
        self.text = ""  # text of the latest interim decode of this utterance
        self.words: tuple[RecognizedWord, ...] = ()  # and its words, when asked for
        self.covered = 0  # samples of the utterance that text covers
        self.interim: asyncio.Task[_Decoded] | None = None
        # The final decode started at the speaker's pause, and the audio it took (None: in line).
        self.ending: asyncio.Task[_Decoded] | None = None
        self.ending_key: tuple[int, int, int] | None = None

    async def run(self, events: StreamQueue[RecognizerEvent]) -> AsyncGenerator[Hypothesis, None]:
        """The recognizer loop (see the module docstring)."""
        try:
            while True:
                batch = events.get_nowait_all() or await self._wait(events)
                if batch is None:
                    return
                for event in batch:
                    if isinstance(event, AudioEvent):
                        self.audio.append(event.samples)
                    else:
                        yield await self._answer(event)
                if self.interim is not None and self.interim.done():
                    yield self._take_interim()
                self._start_ending()
                self._start_interim()
        finally:
            await _discard(self.interim)
            await _discard(self.ending)

    async def _wait(self, events: StreamQueue[RecognizerEvent]) -> list[RecognizerEvent] | None:
        """The next events, or [] when the interim decode finished first; None at the end."""
        if self.interim is None:
            event = await _next_event(events)
            return None if event is None else [event]
        getter = asyncio.ensure_future(_next_event(events))
        try:
            await asyncio.wait({getter, self.interim}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
                await asyncio.wait({getter})
        if getter.cancelled():
            return []
        event = getter.result()
        return None if event is None else [event]

    def _start_interim(self) -> None:
        if not self.options.interim_results or self.interim is not None:
            return  # interims only when asked for, one decode at a time
        if self.ending is not None or self.audio.settled(self.covered):
            return  # a pause: the end decode hears it all; or nothing new to hear
        if self.audio.trailing_silence_s >= INTERIM_QUIET_S:
            return  # speech may be ending: keep the thread free for the end decode
        if len(self.audio) - self.covered < INTERIM_STEP_S * SAMPLE_RATE:
            return
        self.interim = asyncio.create_task(
            self.backend.decode(
                Priority.INTERIM,
                self.audio.snapshot,
                self.options.language,
                self.options.word_timestamps,
            ),
            name=f"{self.options.session_id}-interim",
        )

    def _take_interim(self) -> Hypothesis:
        assert self.interim is not None
        decoded = self.interim.result()
        self.interim = None
        self._learn(decoded)
        return Hypothesis(
            self.text,
            self.audio.offset_ms + 1000.0 * self.covered / SAMPLE_RATE,
            stability=INTERIM_STABILITY,
            words=self._on_utterance_clock(self.words),
        )

    def _start_ending(self) -> None:
        """At a pause in speech, start the decode that a finalize during the pause will reuse."""
        paused = self.audio.voiced and self.audio.trailing_silence_s >= SETTLE_S
        if self.ending is not None and not (paused and self._ending_fits()):
            _drop(self.ending)  # the speaker went on: it heard (or would hear) speech cut short
            self.ending = None
        if paused and self.ending is None:
            self._decode_ending()

    def _decode_ending(self) -> None:
        self.ending_key = None
        self.ending = asyncio.create_task(
            self.backend.decode(
                Priority.FINAL,
                self._ending_snapshot,
                self.options.language,
                self.options.word_timestamps,
            ),
            name=f"{self.options.session_id}-final",
        )

    def _ending_snapshot(self) -> FloatAudio:
        """The final audio of the utterance, taken when the decode's turn on the thread comes."""
        self.ending_key = self.audio.final_key
        return self.audio.final_snapshot(FINAL_SILENCE_S)

    def _ending_fits(self) -> bool:
        """Whether the end decode heard (or, still in line, will hear) the final audio of now."""
        return self.ending_key is None or self.ending_key == self.audio.final_key

    async def _answer(self, finalize: FinalizeEvent) -> Hypothesis:
        # An interim decode is never the answer: it heard the speech cut short (module doc).
        await _discard(self.interim)
        self.interim = None
        decoded = _Decoded("", 0)
        if self.audio.voiced:
            if self.ending is None or not self._ending_fits():
                await _discard(self.ending)
                self._decode_ending()  # the finalize came before a pause, or after more speech
            assert self.ending is not None
            decoded = await self.ending
        stability = INTERIM_STABILITY if finalize.soft else 1.0
        answer = Hypothesis(
            decoded.text,
            self.audio.offset_ms + self.audio.duration_ms,
            answers=finalize,
            stability=stability,
            words=self._on_utterance_clock(decoded.words),
        )
        if not finalize.soft:
            self.ending, self.ending_key = None, None
            self.audio.clear()
            self.text, self.covered, self.words = "", 0, ()
        return answer

    def _on_utterance_clock(self, words: tuple[RecognizedWord, ...]) -> tuple[RecognizedWord, ...]:
        """`words` timed from the utterance's start, not from the audio held (trimmed)."""
        offset = self.audio.offset_ms
        if not offset:
            return words
        return tuple(
            dataclasses.replace(w, start_ms=w.start_ms + offset, end_ms=w.end_ms + offset)
            for w in words
        )

    def _learn(self, decoded: _Decoded) -> None:
        if decoded.samples >= self.covered:
            self.text, self.covered, self.words = decoded.text, decoded.samples, decoded.words


def _drop(task: asyncio.Task[_Decoded]) -> None:
    """Cancel a decode nobody needs any more, without waiting (one on the thread finishes there)."""
    task.cancel()
    task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[_Decoded]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed decode nobody waits for is not worth a warning


async def _discard(task: asyncio.Task[_Decoded] | None) -> None:
    """Cancel a decode nobody needs any more (one already on the thread finishes there)."""
    if task is None:
        return
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    _retrieve(task)


async def _next_event(events: StreamQueue[RecognizerEvent]) -> RecognizerEvent | None:
    try:
        return await events.get()
    except StopAsyncIteration:
        return None

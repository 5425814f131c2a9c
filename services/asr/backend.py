"""The ASR backend seam: what a speech recognition engine implements to serve StreamingRecognize.

A backend knows its model and nothing of gRPC. The servicer hands each stream's recognizer a queue
of events (16 kHz float audio, finalize markers) and relays what it yields. The servicer owns the
protocol: validation, resampling, odd bytes, the utterance cap, offsets, ids, de-duplication of
interim results and timings.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from services.asr.settings import AsrSettings
from services.runtime.audio import FloatAudio
from services.runtime.backend import Backend
from services.runtime.streams import StreamQueue


class FinalizeKind(Enum):
    """Why an utterance is being finalized (mirrors the FinalReason of the contract)."""

    SOFT = "soft"  # answer with the current hypothesis; the utterance goes on
    FINALIZE = "finalize"  # the client ended the utterance
    MAX_DURATION = "max_duration"  # the server's utterance cap was reached
    END_OF_STREAM = "end_of_stream"  # the client half-closed with audio pending


@dataclass(frozen=True)
class AudioEvent:
    """Audio at the backend's sample rate, float32 mono in [-1, 1)."""

    samples: FloatAudio


@dataclass(frozen=True)
class FinalizeEvent:
    """End (or, if soft, sample) the current utterance; the backend answers it exactly once."""

    utterance_id: str
    kind: FinalizeKind
    #: Position of the utterance in the stream's audio, in ms (set by the servicer).
    start_ms: float = 0.0
    end_ms: float = 0.0
    received_at: float = field(default_factory=time.perf_counter)
    #: perf_counter() when the utterance's first audio arrived (None: no audio).
    audio_started_at: float | None = None
    #: W3C trace context of the client's turn (for the servicer's spans; backends ignore it).
    trace_context: Mapping[str, str] = field(default_factory=dict)

    @property
    def soft(self) -> bool:
        """True when the utterance goes on after the answer."""
        return self.kind is FinalizeKind.SOFT


RecognizerEvent = AudioEvent | FinalizeEvent


@dataclass(frozen=True)
class RecognizedWord:
    """A word of a hypothesis and where it lies in the utterance.

    Attributes:
        text: The word as it appears in the hypothesis' text, punctuation included.
        start_ms: Start of the word, in ms from the start of the utterance's audio.
        end_ms: End of the word, same origin.
        confidence: The model's probability for the word (0..1).
    """

    text: str
    start_ms: float
    end_ms: float
    confidence: float


@dataclass(frozen=True)
class Hypothesis:
    """What a recognizer yields: an interim result, or the answer to a finalize.

    Attributes:
        text: The recognized text of the current utterance.
        audio_ms: Milliseconds of the utterance's audio this text covers.
        answers: The finalize this answers, or None for an interim result.
        stability: Unused by the v1 servicer, which measures the stability of what it sends
            (kept for backends and the Riva API).
        words: The words of `text` with their times, when the stream asked for them.
    """

    text: str
    audio_ms: float
    answers: FinalizeEvent | None = None
    stability: float = 0.0
    words: tuple[RecognizedWord, ...] = ()


@dataclass(frozen=True)
class StreamOptions:
    """Per-stream options from the client's config, already validated."""

    session_id: str
    language: str
    interim_results: bool
    #: Hypotheses carry `words` (only asked of backends whose `word_timestamps` is true).
    word_timestamps: bool = False


class AsrBackend(Backend[AsrSettings]):
    """A speech recognition engine.

    Implement `model_name` and `recognize`; the rest has sensible defaults. Blocking inference
    must run off the event loop (`asyncio.to_thread` or the backend's own executor).
    """

    #: Sample rate the model consumes; the servicer resamples client audio to it.
    sample_rate_hz: int = 16000
    #: Whether hypotheses can carry word times (`StreamOptions.word_timestamps`); a stream that
    #: asks a backend without them is refused with INVALID_ARGUMENT.
    word_timestamps: bool = False

    @property
    def languages(self) -> Sequence[str]:
        """BCP-47 primary tags the model recognizes; the first is the default."""
        return ("en",)

    @abstractmethod
    def recognize(
        self, options: StreamOptions, events: StreamQueue[RecognizerEvent]
    ) -> AsyncGenerator[Hypothesis, None]:
        """Recognize one stream: consume `events` until it ends, yielding hypotheses.

        Contract: every FinalizeEvent is answered by exactly one Hypothesis with `answers` set to
        it, in order; after a non-soft finalize the recognizer starts a fresh utterance. Interim
        hypotheses (answers=None) may be yielded at any cadence and are only sent to the client
        when it asked for them and their text changed. An utterance of silence is answered with
        empty text. The generator is closed (aclose) when the call ends, possibly mid-decode.
        """


def silence(duration_s: float, sample_rate_hz: int) -> FloatAudio:
    """A buffer of zeros, e.g. the right-context padding a streaming model needs at finalize."""
    return np.zeros(round(duration_s * sample_rate_hz), dtype=np.float32)

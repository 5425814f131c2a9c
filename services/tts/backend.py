"""The TTS backend seam: what a speech synthesis engine implements to serve Synthesize.

A backend knows its voices and model and nothing of gRPC. The servicer owns the protocol: stream
and segment ids, ordering, normalisation and splitting of text, resampling to the requested rate,
cancellation (by closing the backend's generator), and timings.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import Enum

from services.runtime.audio import FloatAudio
from services.runtime.backend import Backend
from services.runtime.errors import InvalidArgument
from services.tts.settings import TtsSettings
from services.tts.words import TimingSource, WordTime


class SynthesisMode(Enum):
    """STREAM: audio as soon as the model makes it. BATCH: the segment's audio in one piece."""

    STREAM = "stream"
    BATCH = "batch"


@dataclass(frozen=True)
class Voice:
    """A voice a backend offers."""

    name: str
    languages: tuple[str, ...]
    sample_rate_hz: int


def pick_voice(voices: Sequence[Voice], name: str, field: str) -> Voice:
    """The voice called `name`, the first one when `name` is empty.

    Raises:
        InvalidArgument: no voice has that name (naming `field` and the voices there are).
    """
    if not name:
        return voices[0]
    for voice in voices:
        if voice.name == name:
            return voice
    raise InvalidArgument(
        f"unknown voice {name!r} in {field}; choose one of: {', '.join(v.name for v in voices)}",
        field=field,
    )


@dataclass(frozen=True)
class SynthesisJob:
    """One piece of normalised text to speak (a sentence or clause of a segment)."""

    text: str
    voice: Voice
    language: str
    mode: SynthesisMode


@dataclass(frozen=True)
class TimedAudio:
    """Audio and the times of the job's words that start in it.

    Attributes:
        audio: float32 mono audio at the voice's rate.
        words: The words of `job.text.split()` whose audio starts in `audio`, in order, with
            times from the start of `audio`. Together, a job's yields report each word once.
        source: Whether the times come from the model or are estimated.
    """

    audio: FloatAudio
    words: tuple[WordTime, ...]
    source: TimingSource


def samples_of(item: FloatAudio | TimedAudio) -> FloatAudio:
    """The audio of what a backend yielded, with or without word times."""
    return item.audio if isinstance(item, TimedAudio) else item


class TtsBackend(Backend[TtsSettings]):
    """A speech synthesis engine.

    Implement `voices`, `model_name` and `synthesize`. Blocking inference must run off the event
    loop. Several streams call `synthesize` concurrently: keep no per-stream state on the backend.
    """

    @property
    @abstractmethod
    def voices(self) -> Sequence[Voice]:
        """The voices offered; the first is the default."""

    @abstractmethod
    def synthesize(self, job: SynthesisJob) -> AsyncGenerator[FloatAudio | TimedAudio, None]:
        """Speak `job.text`, yielding float32 mono audio at `job.voice.sample_rate_hz`.

        Yield `TimedAudio` to report when the job's words start (clients map played audio to
        words with them); bare audio carries no word times, and its words reach no client.

        In STREAM mode yield audio as soon as it exists (the first chunk decides the time to first
        byte); in BATCH mode the segment may be yielded in one piece. The servicer closes the
        generator (aclose) to cancel: stop work at the next frame boundary and free what the
        synthesis holds.
        """

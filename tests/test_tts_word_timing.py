"""Where the session puts a segment's words: the chunk their start falls in, at any output rate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nemotron.speech.v1 import tts_pb2
from services.runtime.audio import FloatAudio
from services.tts.backend import SynthesisJob, SynthesisMode, TimedAudio
from services.tts.words import TimingSource, WordTime
from tests.doubles import ToneTtsBackendDouble
from tests.helpers import read_all
from tests.tts_messages import BATCH, CLOSE, config, text

Response = tts_pb2.SynthesizeResponse


class TimedToneTtsBackendDouble(ToneTtsBackendDouble):
    """The tone double with word times: each word is 100 ms and starts 10 ms into its audio.

    A word spelled "late" reports a start past the end of its own audio (as rounding could).
    """

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[FloatAudio | TimedAudio]:  # type: ignore[override]
        rate = job.voice.sample_rate_hz
        chunks = [samples async for samples in super().synthesize(job)]
        words = job.text.split()
        if job.mode is SynthesisMode.BATCH:
            times = tuple(WordTime(i, 100 * i + 10, 100 * i + 90) for i in range(len(words)))
            for chunk in chunks:
                yield TimedAudio(chunk, times, TimingSource.MODEL)
            return
        for index, (word, chunk) in enumerate(zip(words, chunks, strict=True)):
            start = 1000 * chunk.size / rate + 5 if word.startswith("late") else 10
            yield TimedAudio(chunk, (WordTime(index, start, start + 80),), TimingSource.MODEL)
            await asyncio.sleep(0)


@pytest.fixture
def tts_backend() -> ToneTtsBackendDouble:
    return TimedToneTtsBackendDouble()


def audio_chunks(responses: list[Response]) -> list[tts_pb2.AudioChunk]:
    return [r.audio for r in responses if r.WhichOneof("response") == "audio"]


def placed(chunks: list[tts_pb2.AudioChunk], rate: int) -> list[tuple[int, str, int, float]]:
    """(chunk index, word, offset, start) of every word, checking it lies in its chunk."""
    result = []
    start_ms = 0.0
    for index, chunk in enumerate(chunks):
        end_ms = start_ms + 1000 * (len(chunk.audio) // 2) / rate
        for word in chunk.words:
            assert word.start_ms >= start_ms - 1e-6
            assert word.start_ms < end_ms or index == len(chunks) - 1
            result.append((index, word.word, word.text_offset, round(word.start_ms, 3)))
        start_ms = end_ms
    return result


@pytest.mark.parametrize("rate", [16000, 48000])
@pytest.mark.parametrize("voice", ["tone", "low-tone"])
async def test_each_word_rides_on_the_chunk_its_start_falls_in(tts_stub, voice, rate):
    written = "one two three"
    requests = [config(voice=voice, rate=rate), text("a", written), CLOSE]
    chunks = audio_chunks(await read_all(tts_stub.Synthesize(iter(requests))))
    words = placed(chunks, rate)
    assert [(w, o, s) for _, w, o, s in words] == [
        ("one", 0, 10),
        ("two", 4, 110),
        ("three", 8, 210),
    ]
    assert all(w.source == tts_pb2.WORD_TIMING_SOURCE_MODEL for c in chunks for w in c.words)


async def test_batch_words_are_shared_among_the_bounded_chunks(tts_stub):
    names = "alpha bravo charlie delta echo foxtrot golf hotel".split()
    written = " ".join(names)  # 800 ms: chunks of 500 and 300 ms
    requests = [config(), text("b", written, BATCH), CLOSE]
    chunks = audio_chunks(await read_all(tts_stub.Synthesize(iter(requests))))
    words = placed(chunks, 16000)
    assert [(i, w) for i, w, _, _ in words] == [(0, w) for w in names[:5]] + [
        (1, w) for w in names[5:]
    ]


async def test_a_start_past_the_audio_rides_on_the_last_chunk(tts_stub):
    requests = [config(), text("a", "one late"), CLOSE]
    chunks = audio_chunks(await read_all(tts_stub.Synthesize(iter(requests))))
    # At the voice's rate nothing follows the last audio: an empty last chunk carries the word.
    assert [len(c.audio) for c in chunks] == [3200, 3200, 0]
    assert [[w.word for w in c.words] for c in chunks] == [["one"], [], ["late"]]
    assert [c.sequence for c in chunks] == [0, 1, 2]


async def test_written_words_keep_their_offsets_through_normalisation(tts_stub):
    written = "It costs $42 \U0001f642 today."
    requests = [config(), text("m", written), CLOSE]
    chunks = audio_chunks(await read_all(tts_stub.Synthesize(iter(requests))))
    words = placed(chunks, 16000)
    # Spoken: "It costs forty two dollars today." (six words, one chunk each).
    assert [(i, w, o) for i, w, o, _ in words] == [
        (0, "It", 0),
        (1, "costs", 3),
        (2, "$42", 9),
        (4, "\U0001f642", 13),  # no length: at the end of "$42" ("dollars", chunk 4)
        (5, "today.", 15),
    ]

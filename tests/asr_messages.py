"""StreamingRecognize messages for the ASR tests: request builders and response filters."""

from __future__ import annotations

from nemotron.speech.v1 import asr_pb2
from tests.helpers import frames

Req = asr_pb2.StreamingRecognizeRequest


def config(
    rate: int = 16000, interim: bool = False, language: str = "", words: bool = False
) -> Req:
    return Req(
        config=asr_pb2.RecognitionConfig(
            sample_rate_hz=rate, interim_results=interim, language=language, word_timestamps=words
        )
    )


def finalize(utterance_id: str, soft: bool = False) -> Req:
    return Req(finalize=asr_pb2.Finalize(utterance_id=utterance_id, soft=soft))


def audio(pcm: bytes, rate: int = 16000) -> list[Req]:
    return [Req(audio=chunk) for chunk in frames(pcm, rate)]


def check_words(transcript: asr_pb2.Transcript) -> None:
    """Assert the contract of `Transcript.words` for a transcript that asked for them."""
    words = list(transcript.words)
    assert " ".join(w.text for w in words) == transcript.text, (transcript.text, words)
    starts = [w.start_ms for w in words]
    assert starts == sorted(starts)
    for word in words:
        assert transcript.audio_start_ms <= word.start_ms <= word.end_ms
        assert word.end_ms <= transcript.audio_end_ms
        assert 0.0 <= word.confidence <= 1.0


def transcripts(responses: list[asr_pb2.StreamingRecognizeResponse]) -> list[asr_pb2.Transcript]:
    return [r.transcript for r in responses if r.WhichOneof("response") == "transcript"]

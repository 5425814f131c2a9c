"""Synthesize messages for the TTS tests: request builders and response filters."""

from __future__ import annotations

from nemotron.speech.v1 import tts_pb2

Req = tts_pb2.SynthesizeRequest
STREAM = tts_pb2.SYNTHESIS_MODE_STREAM
BATCH = tts_pb2.SYNTHESIS_MODE_BATCH
CLOSE = Req(close=tts_pb2.CloseStream())
CANCEL = Req(cancel=tts_pb2.CancelStream())


def config(voice: str = "", rate: int = 0, language: str = "") -> Req:
    return Req(config=tts_pb2.SynthesisConfig(voice=voice, sample_rate_hz=rate, language=language))


def text(segment_id: str, words: str, mode: int = STREAM) -> Req:
    return Req(text=tts_pb2.TextSegment(segment_id=segment_id, text=words, mode=mode))


def kinds(responses: list[tts_pb2.SynthesizeResponse]) -> list[str]:
    return [r.WhichOneof("response") for r in responses]

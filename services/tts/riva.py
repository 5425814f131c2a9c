"""nvidia.riva.tts.RivaSpeechSynthesis on the TTS server, over the same backend and limits.

`Synthesize` answers with the whole audio of its text; `SynthesizeOnline` streams audio chunks as
the backend makes them, for every request of the call in turn (Riva 2.x clients, Pipecat's
NvidiaTTSService among them, send a turn's sentences as several requests on one call). Text is
normalized and split as on the v1 API; each call holds one slot of the server's stream limit.

What Riva offers and this server does not: LINEAR_PCM output only, no zero-shot voice prompts,
custom dictionaries or word timings (ignored), and the voices are the backend's own (an empty
voice_name picks the default).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import ClassVar

import grpc
import numpy as np
from riva.proto import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc

from services.runtime.audio import FloatAudio, StreamResampler, float_to_pcm16
from services.runtime.errors import InvalidArgument, rpc_errors, unary_rpc_errors
from services.runtime.languages import resolve_language
from services.runtime.service import MeshService
from services.tts.backend import (
    SynthesisJob,
    SynthesisMode,
    TtsBackend,
    Voice,
    pick_voice,
    samples_of,
)
from services.tts.settings import TtsSettings
from services.tts.speakable import normalize
from services.tts.splitting import split_for_synthesis

log = logging.getLogger(__name__)

SERVICE_NAME = riva_tts_pb2.DESCRIPTOR.services_by_name["RivaSpeechSynthesis"].full_name
#: Output rates a Riva client may ask for (the backend's audio is resampled to it).
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
_LINEAR_PCM = (riva_audio_pb2.ENCODING_UNSPECIFIED, riva_audio_pb2.LINEAR_PCM)
# Streamed responses carry at most this much audio, so a long sentence still arrives in pieces.
_MAX_CHUNK_MS = 500

Request = riva_tts_pb2.SynthesizeSpeechRequest
Response = riva_tts_pb2.SynthesizeSpeechResponse


@dataclass(frozen=True)
class _Call:
    voice: Voice
    language: str
    sample_rate_hz: int


class RivaTtsServicer(riva_tts_pb2_grpc.RivaSpeechSynthesisServicer):
    """Riva's speech synthesis API in front of a TTS `MeshService`'s backend."""

    service_name: ClassVar[str] = SERVICE_NAME

    def __init__(self, service: MeshService[TtsSettings, TtsBackend]) -> None:
        self.service = service

    def register(self, server: grpc.aio.Server) -> None:
        """Add this servicer to `server`."""
        riva_tts_pb2_grpc.add_RivaSpeechSynthesisServicer_to_server(self, server)

    @unary_rpc_errors
    async def Synthesize(self, request: Request, context: grpc.aio.ServicerContext) -> Response:
        """The whole audio of `request.text` in one response."""
        async with self.service.admit():
            call = self._check(request)
            async with aclosing(self._speak(call, request.text, SynthesisMode.BATCH)) as speech:
                pieces = [chunk async for chunk in speech]
            audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
            return Response(
                audio=float_to_pcm16(audio), meta=self._meta(request, call), id=request.id
            )

    @rpc_errors
    async def SynthesizeOnline(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        """Audio chunks of each request's text, request after request, as they are made."""
        async with self.service.admit():
            call: _Call | None = None
            async for request in request_iterator:
                # Riva clients repeat voice, language and rate in every request of a call; one
                # call speaks in one voice at one rate, so a request that changes them is refused
                # rather than played at a rate the client did not ask for.
                asked = self._check(request)
                if call is not None and asked != call:
                    raise InvalidArgument(
                        "voice_name, language_code and sample_rate_hz must stay the same on "
                        f"one SynthesizeOnline call (first {call.voice.name}, "
                        f"{call.language}, {call.sample_rate_hz} Hz); open a new call to change "
                        "them",
                        field="sample_rate_hz"
                        if asked.sample_rate_hz != call.sample_rate_hz
                        else "voice_name",
                    )
                call = asked
                max_samples = call.sample_rate_hz * _MAX_CHUNK_MS // 1000
                speech = self._speak(call, request.text, SynthesisMode.STREAM)
                async with aclosing(speech) as chunks:
                    async for chunk in chunks:
                        for start in range(0, chunk.size, max_samples):
                            piece = float_to_pcm16(chunk[start : start + max_samples])
                            yield Response(audio=piece, id=request.id)

    @unary_rpc_errors
    async def GetRivaSynthesisConfig(
        self, request: riva_tts_pb2.RivaSynthesisConfigRequest, context: grpc.aio.ServicerContext
    ) -> riva_tts_pb2.RivaSynthesisConfigResponse:
        """One entry per voice, with the parameters Riva clients list voices by."""
        backend = self.service.backend
        configs = [
            riva_tts_pb2.RivaSynthesisConfigResponse.Config(
                model_name=backend.model_name,
                parameters={
                    "voice_name": voice.name,
                    "language_code": ",".join(voice.languages),
                    "sample_rate": str(voice.sample_rate_hz),
                    "subvoices": voice.name,
                    "backend": backend.name,
                },
            )
            for voice in backend.voices
        ]
        if request.model_name:
            configs = [c for c in configs if c.model_name == request.model_name]
        return riva_tts_pb2.RivaSynthesisConfigResponse(model_config=configs)

    def _check(self, request: Request) -> _Call:
        if request.encoding not in _LINEAR_PCM:
            known = request.encoding in riva_audio_pb2.AudioEncoding.values()
            name = riva_audio_pb2.AudioEncoding.Name(request.encoding) if known else "unknown"
            raise InvalidArgument(
                f"audio encoding {name} is not offered; this server sends LINEAR_PCM only",
                field="encoding",
            )
        voice = pick_voice(list(self.service.backend.voices), request.voice_name, "voice_name")
        language = resolve_language(
            request.language_code, voice.languages, voice.languages[0], field="language_code"
        )
        rate = request.sample_rate_hz or voice.sample_rate_hz
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise InvalidArgument(
                f"sample_rate_hz {request.sample_rate_hz} is not offered; use "
                f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} (the voice's own is "
                f"{voice.sample_rate_hz})",
                field="sample_rate_hz",
            )
        return _Call(voice, language, rate)

    def _meta(self, request: Request, call: _Call) -> riva_tts_pb2.SynthesizeSpeechResponseMetadata:
        return riva_tts_pb2.SynthesizeSpeechResponseMetadata(
            text=request.text, processed_text=normalize(request.text, call.language)
        )

    async def _speak(
        self, call: _Call, text: str, mode: SynthesisMode
    ) -> AsyncGenerator[FloatAudio, None]:
        """Float audio of `text` at the call's rate, piece by piece as the backend makes it."""
        settings = self.service.settings
        if len(text) > settings.max_text_chars:
            raise InvalidArgument(
                f"text is {len(text)} characters; at most {settings.max_text_chars} per request",
                field="text",
            )
        resampler = StreamResampler(call.voice.sample_rate_hz, call.sample_rate_hz)
        pieces = split_for_synthesis(normalize(text, call.language), settings.synthesis_chunk_chars)
        for piece in pieces:
            job = SynthesisJob(piece, call.voice, call.language, mode)
            audio = self.service.backend.synthesize(job)
            try:
                async for item in audio:
                    converted = resampler.push(samples_of(item))
                    if converted.size:
                        yield converted
            finally:
                await audio.aclose()
        tail = resampler.flush()
        if tail.size:
            yield tail

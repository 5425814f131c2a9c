"""TtsService: Synthesize (the protocol state machine) and ListVoices, over a `TtsBackend`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from nemotron.speech.v1 import common_pb2, tts_pb2, tts_pb2_grpc
from services.runtime.errors import (
    InvalidArgument,
    rpc_errors,
    unary_rpc_errors,
)
from services.runtime.languages import resolve_language
from services.runtime.protocol import first_request_required
from services.runtime.service import MeshService
from services.runtime.streams import Duplex
from services.tts.backend import TtsBackend, pick_voice
from services.tts.riva import RivaTtsServicer
from services.tts.session import CallConfig, Request, Response, SynthesisSession
from services.tts.settings import TtsSettings

log = logging.getLogger(__name__)

#: Output rates a client may ask for; 0 means the voice's native rate.
OUTPUT_SAMPLE_RATES = (16000, 22050, 24000, 48000)
_ACCEPTED_ENCODINGS = (
    common_pb2.AUDIO_ENCODING_UNSPECIFIED,
    common_pb2.AUDIO_ENCODING_LINEAR16,
)
# Responses buffered for a slow reader: with 500 ms chunks, several seconds of audio.
_RESPONSE_QUEUE_SIZE = 16


class TtsService(MeshService[TtsSettings, TtsBackend], tts_pb2_grpc.TtsServiceServicer):
    """Serves Synthesize and ListVoices with one backend shared by all calls."""

    service_name = tts_pb2.DESCRIPTOR.services_by_name["TtsService"].full_name
    telemetry_name = "nemotron-tts"
    add_to_server = staticmethod(tts_pb2_grpc.add_TtsServiceServicer_to_server)

    #: Riva's speech synthesis API, on the same port.
    companions = (RivaTtsServicer,)

    @rpc_errors
    async def Synthesize(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        """Config, then text/close/cancel -> stream_created, audio, segment_complete, ..."""
        async with self.admit(), Duplex[Response](_RESPONSE_QUEUE_SIZE) as duplex:
            requests = aiter(request_iterator)
            first = await anext(requests, None)
            if first is None:
                return
            session = SynthesisSession(
                self.backend, self.settings, self._configure(first), duplex, self.telemetry
            )
            duplex.spawn(session.read(requests), name="tts-reader")
            duplex.spawn(session.speak(), name="tts-worker")
            try:
                async for response in duplex.responses():
                    yield response
            finally:
                session.end_stream_span(cancelled=True)

    @unary_rpc_errors
    async def ListVoices(
        self, request: tts_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> tts_pb2.ListVoicesResponse:
        """The backend's voices, optionally only those speaking `request.language`."""
        wanted = request.language.replace("_", "-").lower().split("-")[0]
        voices = [
            tts_pb2.Voice(
                name=voice.name,
                languages=voice.languages,
                sample_rate_hz=voice.sample_rate_hz,
                backend=self.backend.name,
                is_default=index == 0,
            )
            for index, voice in enumerate(self.backend.voices)
            if not wanted or wanted in {lang.lower().split("-")[0] for lang in voice.languages}
        ]
        return tts_pb2.ListVoicesResponse(voices=voices)

    def _configure(self, first: Request) -> CallConfig:
        kind = first.WhichOneof("request")
        if kind != "config":
            raise first_request_required("config", kind, "text, close or cancel")
        config = first.config
        voice = pick_voice(list(self.backend.voices), config.voice, "config.voice")
        language = resolve_language(
            config.language, voice.languages, voice.languages[0], field="config.language"
        )
        rate = config.sample_rate_hz or voice.sample_rate_hz
        if rate not in (*OUTPUT_SAMPLE_RATES, voice.sample_rate_hz):
            raise InvalidArgument(
                f"sample_rate_hz {config.sample_rate_hz} is not offered; use 0 (native, "
                f"{voice.sample_rate_hz}) or one of {', '.join(map(str, OUTPUT_SAMPLE_RATES))}",
                field="config.sample_rate_hz",
            )
        if config.encoding not in _ACCEPTED_ENCODINGS:
            raise InvalidArgument("only LINEAR16 audio is offered", field="config.encoding")
        return CallConfig(voice=voice, language=language, sample_rate_hz=rate)

"""The audio side of a recognition stream: client PCM in, recognizer events out.

Shared by the v1 protocol and the Riva-compatible one: both turn LINEAR16 bytes of any length at
the client's rate into float audio at the model's rate, cut utterances at the server's cap, and
mark utterance ends with finalize events whose offsets count samples since the stream began.
They differ only in who decides where an utterance ends (the v1 client's finalize, Riva's
server-side endpointing).
"""

from __future__ import annotations

import time

from services.asr.backend import AudioEvent, FinalizeEvent, FinalizeKind, RecognizerEvent
from services.asr.settings import AsrSettings
from services.runtime.audio import FloatAudio, PcmAssembler, StreamResampler, duration_ms
from services.runtime.streams import StreamQueue


class UtteranceFeed:
    """Feeds one stream's audio and utterance ends to its recognizer's event queue."""

    def __init__(
        self,
        settings: AsrSettings,
        model_rate: int,
        input_rate: int,
        events: StreamQueue[RecognizerEvent],
    ) -> None:
        self.model_rate = model_rate
        self.events = events
        self.max_utterance_samples = round(settings.max_utterance_s * model_rate)
        self.assembler = PcmAssembler()
        self.resampler = StreamResampler(input_rate, model_rate)
        self.stream_samples = 0  # at the model rate, since the stream began
        self.utterance_start = 0
        self.utterance_audio_at: float | None = None

    @property
    def pending(self) -> bool:
        """True when audio arrived since the last utterance ended."""
        return self.stream_samples > self.utterance_start

    @property
    def pending_ms(self) -> float:
        """Milliseconds of audio since the last utterance ended."""
        return duration_ms(self.stream_samples - self.utterance_start, self.model_rate)

    async def audio(self, data: bytes) -> FloatAudio:
        """Queue LINEAR16 `data`; returns it at the model rate (for a VAD to look at)."""
        samples = self.resampler.push(self.assembler.push(data))
        converted = samples
        while samples.size:
            room = self.utterance_start + self.max_utterance_samples - self.stream_samples
            head, samples = samples[:room], samples[room:]
            await self._emit(head)
            if self.stream_samples - self.utterance_start >= self.max_utterance_samples:
                await self.finalize("", FinalizeKind.MAX_DURATION, flush=False)
        return converted

    async def finalize(
        self,
        utterance_id: str,
        kind: FinalizeKind,
        flush: bool = True,
        trace_context: dict[str, str] | None = None,
    ) -> FinalizeEvent:
        """End (or, if soft, sample) the current utterance; returns the queued event."""
        if kind is not FinalizeKind.SOFT and flush:
            await self._emit(self.resampler.flush())
        event = FinalizeEvent(
            utterance_id=utterance_id,
            kind=kind,
            start_ms=duration_ms(self.utterance_start, self.model_rate),
            end_ms=duration_ms(self.stream_samples, self.model_rate),
            audio_started_at=self.utterance_audio_at,
            trace_context=trace_context or {},
        )
        await self.events.put(event)
        if kind is not FinalizeKind.SOFT:
            self.utterance_start = self.stream_samples
            self.utterance_audio_at = None
        return event

    async def end(self) -> None:
        """The client half-closed: finalize pending audio, then end the events."""
        if self.pending:
            await self.finalize("", FinalizeKind.END_OF_STREAM)
        self.events.close()

    async def _emit(self, samples: FloatAudio) -> None:
        if samples.size:
            if self.utterance_audio_at is None:
                self.utterance_audio_at = time.perf_counter()
            self.stream_samples += samples.size
            await self.events.put(AudioEvent(samples))

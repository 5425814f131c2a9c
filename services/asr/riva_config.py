"""Validation of Riva's RecognitionConfig, and the audio of an offline Recognize request.

Bad input gets Riva's own status code, INVALID_ARGUMENT, with a message that names the field
and what would be accepted.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

from riva.proto import riva_asr_pb2, riva_audio_pb2

from services.asr.endpointing import (
    DEFAULT_START_HISTORY_MS,
    DEFAULT_START_THRESHOLD,
    DEFAULT_STOP_HISTORY_MS,
    DEFAULT_STOP_THRESHOLD,
    EndpointingRules,
)
from services.runtime.errors import InvalidArgument
from services.runtime.languages import resolve_language

#: Input rates accepted (resampled to the model's rate), as on the v1 API.
SUPPORTED_SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
_LINEAR_PCM = (riva_audio_pb2.ENCODING_UNSPECIFIED, riva_audio_pb2.LINEAR_PCM)
_MAX_ENDPOINT_HISTORY_MS = 10_000


@dataclass(frozen=True)
class RivaOptions:
    """What a validated RecognitionConfig asks of the recognizer and of the results."""

    language: str  # the backend's tag ("en")
    language_code: str  # as the client wrote it, echoed on results ("en-US")
    sample_rate_hz: int
    punctuation: bool
    word_offsets: bool
    endpointing: EndpointingRules


def check_config(
    config: riva_asr_pb2.RecognitionConfig,
    languages: tuple[str, ...],
    model_name: str,
    prefix: str,
    sample_rate_hz: int | None = None,
) -> RivaOptions:
    """Validate `config` (`prefix` names it in messages); `sample_rate_hz` from a WAV header."""
    encoding = config.encoding
    if encoding not in _LINEAR_PCM:
        name = riva_audio_pb2.AudioEncoding.Name(encoding) if _known(encoding) else str(encoding)
        raise InvalidArgument(
            f"audio encoding {name} is not supported; this server accepts LINEAR_PCM only "
            "(16-bit little-endian PCM; FLAC, MULAW, ALAW and OGGOPUS are not decoded)",
            field=f"{prefix}.encoding",
        )
    rate = sample_rate_hz or config.sample_rate_hertz
    if rate not in SUPPORTED_SAMPLE_RATES:
        raise InvalidArgument(
            f"sample_rate_hertz {rate} is not supported; use one of "
            f"{', '.join(map(str, SUPPORTED_SAMPLE_RATES))}",
            field=f"{prefix}.sample_rate_hertz",
        )
    if config.audio_channel_count > 1:
        raise InvalidArgument(
            f"audio_channel_count {config.audio_channel_count} is not supported; send mono audio",
            field=f"{prefix}.audio_channel_count",
        )
    if config.model and config.model != model_name:
        raise InvalidArgument(
            f"model {config.model!r} is not served here; leave it empty or use {model_name!r}",
            field=f"{prefix}.model",
        )
    language = resolve_language(
        config.language_code, languages, languages[0], field=f"{prefix}.language_code"
    )
    return RivaOptions(
        language=language,
        language_code=config.language_code or language,
        sample_rate_hz=rate,
        punctuation=config.enable_automatic_punctuation,
        word_offsets=config.enable_word_time_offsets,
        endpointing=endpointing_rules(config.endpointing_config, f"{prefix}.endpointing_config"),
    )


def endpointing_rules(config: riva_asr_pb2.EndpointingConfig, prefix: str) -> EndpointingRules:
    """Riva's endpointing settings, with its defaults where a field is 0 (unset)."""
    for name in ("start_history", "stop_history", "stop_history_eou"):
        value = getattr(config, name)
        if not 0 <= value <= _MAX_ENDPOINT_HISTORY_MS:
            raise InvalidArgument(
                f"{name} {value} is out of range; use 0 (default) to {_MAX_ENDPOINT_HISTORY_MS} ms",
                field=f"{prefix}.{name}",
            )
    for name in ("start_threshold", "stop_threshold", "stop_threshold_eou"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise InvalidArgument(
                f"{name} {value} is out of range; use 0 (default) to 1",
                field=f"{prefix}.{name}",
            )
    return EndpointingRules(
        start_history_ms=config.start_history or DEFAULT_START_HISTORY_MS,
        start_threshold=config.start_threshold or DEFAULT_START_THRESHOLD,
        stop_history_ms=config.stop_history or DEFAULT_STOP_HISTORY_MS,
        stop_threshold=config.stop_threshold or DEFAULT_STOP_THRESHOLD,
        stop_history_eou_ms=config.stop_history_eou,
        stop_threshold_eou=config.stop_threshold_eou or DEFAULT_STOP_THRESHOLD,
    )


def offline_audio(data: bytes, prefix: str) -> tuple[bytes, int | None]:
    """PCM bytes of a Recognize request, and the rate its WAV header names (None: raw PCM).

    Riva's clients send a WAV file whole, header included, so the header is read here.
    """
    if not (data[:4] == b"RIFF" and data[8:12] == b"WAVE"):
        return data, None
    try:
        with wave.open(io.BytesIO(data)) as wav:
            if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                raise InvalidArgument(
                    f"WAV audio must be 16-bit mono; got {8 * wav.getsampwidth()}-bit, "
                    f"{wav.getnchannels()} channels",
                    field=f"{prefix}.audio",
                )
            return wav.readframes(wav.getnframes()), wav.getframerate()
    except (wave.Error, EOFError) as err:
        raise InvalidArgument(
            f"audio looks like a WAV file but cannot be read ({err}); send 16-bit PCM WAV or "
            "raw LINEAR_PCM",
            field=f"{prefix}.audio",
        ) from err


def _known(encoding: int) -> bool:
    return encoding in riva_audio_pb2.AudioEncoding.values()

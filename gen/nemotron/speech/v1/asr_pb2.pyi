from nemotron.speech.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINAL_REASON_UNSPECIFIED: _ClassVar[FinalReason]
    FINAL_REASON_FINALIZE: _ClassVar[FinalReason]
    FINAL_REASON_MAX_DURATION: _ClassVar[FinalReason]
    FINAL_REASON_END_OF_STREAM: _ClassVar[FinalReason]
FINAL_REASON_UNSPECIFIED: FinalReason
FINAL_REASON_FINALIZE: FinalReason
FINAL_REASON_MAX_DURATION: FinalReason
FINAL_REASON_END_OF_STREAM: FinalReason

class StreamingRecognizeRequest(_message.Message):
    __slots__ = ("config", "audio", "finalize")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FINALIZE_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    audio: bytes
    finalize: Finalize
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., audio: _Optional[bytes] = ..., finalize: _Optional[_Union[Finalize, _Mapping]] = ...) -> None: ...

class RecognitionConfig(_message.Message):
    __slots__ = ("sample_rate_hz", "encoding", "language", "interim_results", "word_timestamps")
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    sample_rate_hz: int
    encoding: _common_pb2.AudioEncoding
    language: str
    interim_results: bool
    word_timestamps: bool
    def __init__(self, sample_rate_hz: _Optional[int] = ..., encoding: _Optional[_Union[_common_pb2.AudioEncoding, str]] = ..., language: _Optional[str] = ..., interim_results: _Optional[bool] = ..., word_timestamps: _Optional[bool] = ...) -> None: ...

class Finalize(_message.Message):
    __slots__ = ("utterance_id", "soft", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    utterance_id: str
    soft: bool
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, utterance_id: _Optional[str] = ..., soft: _Optional[bool] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StreamingRecognizeResponse(_message.Message):
    __slots__ = ("ready", "transcript")
    READY_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    ready: RecognizerReady
    transcript: Transcript
    def __init__(self, ready: _Optional[_Union[RecognizerReady, _Mapping]] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ...) -> None: ...

class RecognizerReady(_message.Message):
    __slots__ = ("session_id", "model", "backend", "language")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    backend: str
    language: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class Transcript(_message.Message):
    __slots__ = ("text", "is_final", "utterance_id", "audio_start_ms", "audio_end_ms", "stability", "soft", "final_reason", "timing", "words")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_START_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_END_MS_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    FINAL_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    is_final: bool
    utterance_id: str
    audio_start_ms: int
    audio_end_ms: int
    stability: float
    soft: bool
    final_reason: FinalReason
    timing: _common_pb2.Timing
    words: _containers.RepeatedCompositeFieldContainer[Word]
    def __init__(self, text: _Optional[str] = ..., is_final: _Optional[bool] = ..., utterance_id: _Optional[str] = ..., audio_start_ms: _Optional[int] = ..., audio_end_ms: _Optional[int] = ..., stability: _Optional[float] = ..., soft: _Optional[bool] = ..., final_reason: _Optional[_Union[FinalReason, str]] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ...) -> None: ...

class Word(_message.Message):
    __slots__ = ("text", "start_ms", "end_ms", "confidence")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    start_ms: int
    end_ms: int
    confidence: float
    def __init__(self, text: _Optional[str] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., confidence: _Optional[float] = ...) -> None: ...

from nemotron.speech.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SynthesisMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNTHESIS_MODE_UNSPECIFIED: _ClassVar[SynthesisMode]
    SYNTHESIS_MODE_STREAM: _ClassVar[SynthesisMode]
    SYNTHESIS_MODE_BATCH: _ClassVar[SynthesisMode]

class WordTimingSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORD_TIMING_SOURCE_UNSPECIFIED: _ClassVar[WordTimingSource]
    WORD_TIMING_SOURCE_MODEL: _ClassVar[WordTimingSource]
    WORD_TIMING_SOURCE_ESTIMATED: _ClassVar[WordTimingSource]
SYNTHESIS_MODE_UNSPECIFIED: SynthesisMode
SYNTHESIS_MODE_STREAM: SynthesisMode
SYNTHESIS_MODE_BATCH: SynthesisMode
WORD_TIMING_SOURCE_UNSPECIFIED: WordTimingSource
WORD_TIMING_SOURCE_MODEL: WordTimingSource
WORD_TIMING_SOURCE_ESTIMATED: WordTimingSource

class SynthesizeRequest(_message.Message):
    __slots__ = ("config", "text", "close", "cancel")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    config: SynthesisConfig
    text: TextSegment
    close: CloseStream
    cancel: CancelStream
    def __init__(self, config: _Optional[_Union[SynthesisConfig, _Mapping]] = ..., text: _Optional[_Union[TextSegment, _Mapping]] = ..., close: _Optional[_Union[CloseStream, _Mapping]] = ..., cancel: _Optional[_Union[CancelStream, _Mapping]] = ...) -> None: ...

class SynthesisConfig(_message.Message):
    __slots__ = ("voice", "language", "sample_rate_hz", "encoding")
    VOICE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    voice: str
    language: str
    sample_rate_hz: int
    encoding: _common_pb2.AudioEncoding
    def __init__(self, voice: _Optional[str] = ..., language: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ..., encoding: _Optional[_Union[_common_pb2.AudioEncoding, str]] = ...) -> None: ...

class TextSegment(_message.Message):
    __slots__ = ("segment_id", "text", "mode", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    segment_id: str
    text: str
    mode: SynthesisMode
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, segment_id: _Optional[str] = ..., text: _Optional[str] = ..., mode: _Optional[_Union[SynthesisMode, str]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CloseStream(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelStream(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("stream_created", "audio", "segment_complete", "done", "cancelled")
    STREAM_CREATED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    stream_created: StreamCreated
    audio: AudioChunk
    segment_complete: SegmentComplete
    done: StreamDone
    cancelled: StreamCancelled
    def __init__(self, stream_created: _Optional[_Union[StreamCreated, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., segment_complete: _Optional[_Union[SegmentComplete, _Mapping]] = ..., done: _Optional[_Union[StreamDone, _Mapping]] = ..., cancelled: _Optional[_Union[StreamCancelled, _Mapping]] = ...) -> None: ...

class StreamCreated(_message.Message):
    __slots__ = ("stream_id", "sample_rate_hz", "encoding", "voice", "language", "model", "backend")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    sample_rate_hz: int
    encoding: _common_pb2.AudioEncoding
    voice: str
    language: str
    model: str
    backend: str
    def __init__(self, stream_id: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ..., encoding: _Optional[_Union[_common_pb2.AudioEncoding, str]] = ..., voice: _Optional[str] = ..., language: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("stream_id", "segment_id", "audio", "sequence", "words")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    segment_id: str
    audio: bytes
    sequence: int
    words: _containers.RepeatedCompositeFieldContainer[WordTiming]
    def __init__(self, stream_id: _Optional[str] = ..., segment_id: _Optional[str] = ..., audio: _Optional[bytes] = ..., sequence: _Optional[int] = ..., words: _Optional[_Iterable[_Union[WordTiming, _Mapping]]] = ...) -> None: ...

class WordTiming(_message.Message):
    __slots__ = ("word", "text_offset", "start_ms", "end_ms", "source")
    WORD_FIELD_NUMBER: _ClassVar[int]
    TEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    word: str
    text_offset: int
    start_ms: float
    end_ms: float
    source: WordTimingSource
    def __init__(self, word: _Optional[str] = ..., text_offset: _Optional[int] = ..., start_ms: _Optional[float] = ..., end_ms: _Optional[float] = ..., source: _Optional[_Union[WordTimingSource, str]] = ...) -> None: ...

class SegmentComplete(_message.Message):
    __slots__ = ("stream_id", "segment_id", "audio_ms", "timing")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    segment_id: str
    audio_ms: float
    timing: _common_pb2.Timing
    def __init__(self, stream_id: _Optional[str] = ..., segment_id: _Optional[str] = ..., audio_ms: _Optional[float] = ..., timing: _Optional[_Union[_common_pb2.Timing, _Mapping]] = ...) -> None: ...

class StreamDone(_message.Message):
    __slots__ = ("stream_id", "total_audio_ms")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    total_audio_ms: float
    def __init__(self, stream_id: _Optional[str] = ..., total_audio_ms: _Optional[float] = ...) -> None: ...

class StreamCancelled(_message.Message):
    __slots__ = ("stream_id", "dropped_segments")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    dropped_segments: int
    def __init__(self, stream_id: _Optional[str] = ..., dropped_segments: _Optional[int] = ...) -> None: ...

class ListVoicesRequest(_message.Message):
    __slots__ = ("language",)
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    language: str
    def __init__(self, language: _Optional[str] = ...) -> None: ...

class ListVoicesResponse(_message.Message):
    __slots__ = ("voices",)
    VOICES_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[Voice]
    def __init__(self, voices: _Optional[_Iterable[_Union[Voice, _Mapping]]] = ...) -> None: ...

class Voice(_message.Message):
    __slots__ = ("name", "languages", "sample_rate_hz", "backend", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    languages: _containers.RepeatedScalarFieldContainer[str]
    sample_rate_hz: int
    backend: str
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., languages: _Optional[_Iterable[str]] = ..., sample_rate_hz: _Optional[int] = ..., backend: _Optional[str] = ..., is_default: _Optional[bool] = ...) -> None: ...

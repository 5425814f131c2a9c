from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("service", "backend", "model", "version", "ready", "active_streams", "max_streams", "uptime_s")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    service: str
    backend: str
    model: str
    version: str
    ready: bool
    active_streams: int
    max_streams: int
    uptime_s: float
    def __init__(self, service: _Optional[str] = ..., backend: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., ready: _Optional[bool] = ..., active_streams: _Optional[int] = ..., max_streams: _Optional[int] = ..., uptime_s: _Optional[float] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_KIND_UNSPECIFIED: _ClassVar[FrameKind]
    FRAME_KIND_DATA: _ClassVar[FrameKind]
    FRAME_KIND_ABORT: _ClassVar[FrameKind]
    FRAME_KIND_CLOSE: _ClassVar[FrameKind]
FRAME_KIND_UNSPECIFIED: FrameKind
FRAME_KIND_DATA: FrameKind
FRAME_KIND_ABORT: FrameKind
FRAME_KIND_CLOSE: FrameKind

class Frame(_message.Message):
    __slots__ = ("session", "seq", "tag", "kind", "dtype", "shape", "chunk_index", "chunk_count", "total_bytes", "payload")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    session: str
    seq: int
    tag: str
    kind: FrameKind
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    chunk_index: int
    chunk_count: int
    total_bytes: int
    payload: bytes
    def __init__(self, session: _Optional[str] = ..., seq: _Optional[int] = ..., tag: _Optional[str] = ..., kind: _Optional[_Union[FrameKind, str]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ReadyRequest(_message.Message):
    __slots__ = ("session", "role")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    session: str
    role: str
    def __init__(self, session: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class ReadyReply(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: _Optional[str] = ...) -> None: ...

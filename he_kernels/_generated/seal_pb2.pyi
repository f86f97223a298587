from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CkksParameters(_message.Message):
    __slots__ = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits")
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MOD_BIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    poly_modulus_degree: int
    coeff_mod_bit_sizes: _containers.RepeatedScalarFieldContainer[int]
    scale_bits: int
    def __init__(self, poly_modulus_degree: _Optional[int] = ..., coeff_mod_bit_sizes: _Optional[_Iterable[int]] = ..., scale_bits: _Optional[int] = ...) -> None: ...

class HeContext(_message.Message):
    __slots__ = ("params", "rotation_steps", "public_key", "relin_keys", "galois_keys", "secret_key")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    RELIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    GALOIS_KEYS_FIELD_NUMBER: _ClassVar[int]
    SECRET_KEY_FIELD_NUMBER: _ClassVar[int]
    params: CkksParameters
    rotation_steps: _containers.RepeatedScalarFieldContainer[int]
    public_key: bytes
    relin_keys: bytes
    galois_keys: bytes
    secret_key: bytes
    def __init__(self, params: _Optional[_Union[CkksParameters, _Mapping]] = ..., rotation_steps: _Optional[_Iterable[int]] = ..., public_key: _Optional[bytes] = ..., relin_keys: _Optional[bytes] = ..., galois_keys: _Optional[bytes] = ..., secret_key: _Optional[bytes] = ...) -> None: ...

class ColumnLayout(_message.Message):
    __slots__ = ("rows", "cols", "block", "slots", "duplicated")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATED_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    block: int
    slots: int
    duplicated: bool
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., block: _Optional[int] = ..., slots: _Optional[int] = ..., duplicated: _Optional[bool] = ...) -> None: ...

class DiagonalLayout(_message.Message):
    __slots__ = ("rows", "block", "slots")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    block: int
    slots: int
    def __init__(self, rows: _Optional[int] = ..., block: _Optional[int] = ..., slots: _Optional[int] = ...) -> None: ...

class EncTensor(_message.Message):
    __slots__ = ("column", "diagonal", "ciphertexts")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    DIAGONAL_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    column: ColumnLayout
    diagonal: DiagonalLayout
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, column: _Optional[_Union[ColumnLayout, _Mapping]] = ..., diagonal: _Optional[_Union[DiagonalLayout, _Mapping]] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Ciphertexts(_message.Message):
    __slots__ = ("ciphertexts",)
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

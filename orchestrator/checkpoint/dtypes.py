"""TensorFlow ``DataType`` enum values <-> numpy dtypes, and their on-disk sizes.

Every POD dtype is stored as its little-endian memory image (reference 4.4, 5.1);
``DT_STRING`` tensors are numpy object arrays of ``bytes``; bfloat16, the float8
types and int4/uint4 are their ``ml_dtypes`` types. Quantized types read as their plain integer counterparts.
"""

from __future__ import annotations

import functools

import numpy as np

from orchestrator.checkpoint.errors import UnsupportedDtypeError

DT_FLOAT = 1
DT_DOUBLE = 2
DT_INT32 = 3
DT_UINT8 = 4
DT_INT16 = 5
DT_INT8 = 6
DT_STRING = 7
DT_COMPLEX64 = 8
DT_INT64 = 9
DT_BOOL = 10
DT_QINT8 = 11
DT_QUINT8 = 12
DT_QINT32 = 13
DT_BFLOAT16 = 14
DT_QINT16 = 15
DT_QUINT16 = 16
DT_UINT16 = 17
DT_COMPLEX128 = 18
DT_HALF = 19
DT_RESOURCE = 20
DT_VARIANT = 21
DT_UINT32 = 22
DT_UINT64 = 23
DT_FLOAT8_E5M2 = 24
DT_FLOAT8_E4M3FN = 25
DT_FLOAT8_E4M3FNUZ = 26
DT_FLOAT8_E4M3B11FNUZ = 27
DT_FLOAT8_E5M2FNUZ = 28
DT_INT4 = 29
DT_UINT4 = 30

OBJECT = np.dtype(object)

# What we write: one enum per numpy dtype.
_TO_NUMPY: dict[int, np.dtype] = {
    DT_FLOAT: np.dtype("<f4"),
    DT_DOUBLE: np.dtype("<f8"),
    DT_INT32: np.dtype("<i4"),
    DT_UINT8: np.dtype("u1"),
    DT_INT16: np.dtype("<i2"),
    DT_INT8: np.dtype("i1"),
    DT_COMPLEX64: np.dtype("<c8"),
    DT_INT64: np.dtype("<i8"),
    DT_BOOL: np.dtype("?"),
    DT_UINT16: np.dtype("<u2"),
    DT_COMPLEX128: np.dtype("<c16"),
    DT_HALF: np.dtype("<f2"),
    DT_UINT32: np.dtype("<u4"),
    DT_UINT64: np.dtype("<u8"),
}
# What we can also read.
_QUANTIZED: dict[int, np.dtype] = {
    DT_QINT8: np.dtype("i1"),
    DT_QUINT8: np.dtype("u1"),
    DT_QINT32: np.dtype("<i4"),
    DT_QINT16: np.dtype("<i2"),
    DT_QUINT16: np.dtype("<u2"),
}
_READABLE = {**_TO_NUMPY, **_QUANTIZED}
_FROM_NUMPY = {dtype: enum for enum, dtype in _TO_NUMPY.items()}
# The types numpy lacks, by their ml_dtypes names: they sit outside the tables above so that
# ml_dtypes is imported only when such a tensor is met (see ml_dtype()). On disk each element
# is one memory image, like any POD type: 2 bytes for bfloat16, 1 byte for the float8 types
# and for int4/uint4 (the value in the low nibble, as ml_dtypes holds it; checked against
# TensorFlow 2.21's SaveV2 and its reader).
_ML_DTYPES: dict[int, str] = {
    DT_BFLOAT16: "bfloat16",
    DT_FLOAT8_E5M2: "float8_e5m2",
    DT_FLOAT8_E4M3FN: "float8_e4m3fn",
    DT_FLOAT8_E4M3FNUZ: "float8_e4m3fnuz",
    DT_FLOAT8_E4M3B11FNUZ: "float8_e4m3b11fnuz",
    DT_FLOAT8_E5M2FNUZ: "float8_e5m2fnuz",
    DT_INT4: "int4",
    DT_UINT4: "uint4",
}
_ML_ENUMS = {name: enum for enum, name in _ML_DTYPES.items()}
_POD = frozenset(_READABLE) | frozenset(_ML_DTYPES)

# Dtypes TF can reassemble from slices (reference 6.3); slicing others makes TF fail.
SLICEABLE = frozenset({
    DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_COMPLEX64,
    DT_COMPLEX128, DT_INT64, DT_BOOL, DT_QINT32, DT_QUINT8, DT_QINT8, DT_BFLOAT16,
})

_NAMES = {
    DT_STRING: "string", DT_VARIANT: "variant", DT_RESOURCE: "resource",
    DT_QINT8: "qint8", DT_QUINT8: "quint8", DT_QINT32: "qint32", DT_QINT16: "qint16", DT_QUINT16: "quint16",
    **_ML_DTYPES,
}


@functools.cache
def ml_dtype(name: str) -> np.dtype:
    """``ml_dtypes.<name>`` (bfloat16, float8_e5m2, int4, ...), imported on first use.

    The import takes about half a second (its C extension registers every type with numpy),
    which every worker process and every CLI start would otherwise pay for types most jobs
    never hold. A caller that already has such an array has imported ml_dtypes, so the
    lookup is then free.
    """
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


def bfloat16() -> np.dtype:
    """``ml_dtypes.bfloat16``, imported on first use (see ``ml_dtype``)."""
    return ml_dtype("bfloat16")


def is_string(enum: int) -> bool:
    return enum == DT_STRING


def is_pod(enum: int) -> bool:
    return enum in _POD


def to_numpy(enum: int, what: str = "tensor") -> np.dtype:
    """The numpy dtype a tensor of TF type ``enum`` reads as (object for strings)."""
    if enum == DT_STRING:
        return OBJECT
    if enum in _ML_DTYPES:
        return ml_dtype(_ML_DTYPES[enum])
    try:
        return _READABLE[enum]
    except KeyError:
        raise UnsupportedDtypeError(f"{what}: TensorFlow dtype {dtype_name(enum)} is not supported") from None


def element_size(enum: int) -> int:
    """Bytes per element on disk for a POD dtype."""
    return to_numpy(enum).itemsize


def from_numpy(dtype, what: str = "tensor") -> int:
    """The TF enum to store a numpy dtype as. Object/str/bytes arrays become DT_STRING."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return DT_STRING
    enum = _FROM_NUMPY.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if enum is None and dtype.name in _ML_ENUMS and dtype == ml_dtype(dtype.name):
        enum = _ML_ENUMS[dtype.name]
    if enum is None:
        raise UnsupportedDtypeError(f"{what}: numpy dtype {dtype} has no TensorFlow checkpoint equivalent")
    return enum


def dtype_name(enum: int) -> str:
    """A short readable name: numpy's for POD types, ``string``/``variant`` otherwise."""
    if enum in _NAMES:
        return _NAMES[enum]
    if enum in _TO_NUMPY:
        return _TO_NUMPY[enum].name
    return f"DataType({enum})"

"""Partitioned ("sliced") tensors: slice key encoding and reassembly (reference section 6).

A partitioned tensor is stored as one *full entry* (dtype, full shape, the list of its
slices) plus one ordinary entry per slice under a key built with TF's ``OrderedCode``:
``NumIncreasing(0) ‖ String(name) ‖ NumIncreasing(rank) ‖ (SignedNumIncreasing(start),
SignedNumIncreasing(length)) per dim``. A whole dimension is start 0, length -1. Readers
only ever *encode* these keys, never decode them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from orchestrator.checkpoint.protos import TensorSliceProto
from orchestrator.errors import InvalidArgumentError

FULL = -1  # the length of an extent that spans the whole dimension

# (byte 0, byte 1) XOR masks of an n-byte SignedNumIncreasing, n = 2..10
_SIGNED_HEADERS = {
    2: (0xC0, 0x00), 3: (0xE0, 0x00), 4: (0xF0, 0x00), 5: (0xF8, 0x00), 6: (0xFC, 0x00),
    7: (0xFE, 0x00), 8: (0xFF, 0x00), 9: (0xFF, 0x80), 10: (0xFF, 0xC0),
}


@dataclass(frozen=True)
class Extent:
    """One dimension of a slice; ``length == FULL`` spans the whole dimension."""

    start: int
    length: int

    @property
    def is_full(self) -> bool:
        return self.length == FULL

    def bounds(self, dim: int) -> tuple[int, int]:
        """``(start, stop)`` in a dimension of size ``dim``."""
        return (0, dim) if self.is_full else (self.start, self.start + self.length)


# ---------------------------------------------------------------------------- OrderedCode
def encode_num_increasing(value: int) -> bytes:
    """Unsigned: a length byte, then the big-endian significant bytes."""
    body = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(body)]) + body


def encode_string(value: bytes) -> bytes:
    """0x00 -> 00 ff, 0xff -> ff 00, terminated by 00 01: keeps bytewise order."""
    escaped = bytearray()
    for byte in value:
        escaped += b"\x00\xff" if byte == 0 else b"\xff\x00" if byte == 0xFF else bytes([byte])
    return bytes(escaped) + b"\x00\x01"


def encode_signed_num_increasing(value: int) -> bytes:
    """Signed int64 whose encodings sort like the numbers (one byte for -64..63)."""
    x = value if value >= 0 else ~value
    if x < 64:
        return bytes([(value ^ 0x80) & 0xFF])
    n = next(n for n in range(2, 11) if x < 1 << (7 * n - 1))
    body = bytearray((value & ((1 << (8 * n)) - 1)).to_bytes(n, "big"))
    h1, h2 = _SIGNED_HEADERS[n]
    body[0] ^= h1
    body[1] ^= h2
    return bytes(body)


def slice_key(name: bytes, extents: Sequence[Extent]) -> bytes:
    """The index key of one stored slice of tensor ``name``."""
    parts = [encode_num_increasing(0), encode_string(name), encode_num_increasing(len(extents))]
    for ext in extents:
        start, length = (0, FULL) if ext.is_full else (ext.start, ext.length)
        parts.append(encode_signed_num_increasing(start))
        parts.append(encode_signed_num_increasing(length))
    return b"".join(parts)


# ---------------------------------------------------------------------------- protos
def to_proto(extents: Sequence[Extent]) -> TensorSliceProto:
    """TF's serialization: a full dim is an empty Extent; else start (if non-zero) + length."""
    proto = TensorSliceProto()
    for ext in extents:
        item = proto.extent.add()
        if not ext.is_full:
            item.start = ext.start
            item.length = ext.length
    return proto


def from_proto(proto: TensorSliceProto) -> list[Extent]:
    return [Extent(e.start, e.length) if e.HasField("length") else Extent(0, FULL) for e in proto.extent]


def make_extents(full_shape: Sequence[int], starts: Sequence[int], lengths: Sequence[int]) -> list[Extent]:
    """Validated extents; raises ``ValueError`` naming the bad dimension."""
    if not (len(full_shape) == len(starts) == len(lengths)):
        raise InvalidArgumentError(f"rank mismatch: full shape {tuple(full_shape)}, starts {tuple(starts)}, "
                                   f"lengths {tuple(lengths)}")
    extents = []
    for d, (dim, start, length) in enumerate(zip(full_shape, starts, lengths)):
        ext = Extent(int(start), int(length))
        if ext.is_full and ext.start != 0:
            raise InvalidArgumentError(f"dimension {d}: a full extent (length -1) must start at 0, got {start}")
        lo, hi = ext.bounds(int(dim))
        if lo < 0 or hi > dim or (not ext.is_full and ext.length < 0):
            raise InvalidArgumentError(f"dimension {d}: extent start={start} length={length} outside [0, {dim})")
        extents.append(ext)
    return extents


def covers_whole(full_shape: Sequence[int], extents: Sequence[Extent]) -> bool:
    """True if the slice is the whole tensor (TF then stores it as an ordinary entry)."""
    return all(ext.bounds(dim) == (0, dim) for dim, ext in zip(full_shape, extents))


def slice_shape(full_shape: Sequence[int], extents: Sequence[Extent]) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in (ext.bounds(dim) for dim, ext in zip(full_shape, extents)))


def region(full_shape: Sequence[int], extents: Sequence[Extent]) -> tuple[slice, ...]:
    return tuple(slice(*ext.bounds(dim)) for dim, ext in zip(full_shape, extents))


# ---------------------------------------------------------------------------- reassembly
class Assembler:
    """Copies slices into one full-shape array and tracks which elements were covered."""

    def __init__(self, full_shape: Sequence[int], dtype: np.dtype):
        self.full_shape = tuple(int(d) for d in full_shape)
        self.array = np.zeros(self.full_shape, dtype=dtype)
        self._covered = np.zeros(self.full_shape, dtype=bool)

    def place(self, extents: Sequence[Extent], piece: np.ndarray) -> None:
        where = region(self.full_shape, extents)
        self.array[where] = piece
        self._covered[where] = True

    @property
    def complete(self) -> bool:
        return bool(self._covered.all())

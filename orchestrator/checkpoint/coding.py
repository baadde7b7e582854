"""Integer encodings of the LevelDB table format: varints and little-endian fixed ints.

Decoders take ``(buf, pos)`` and return ``(value, new_pos)``; they raise ``ValueError``
on truncated or over-long input so callers can turn it into a typed checkpoint error
that names the file.
"""

from __future__ import annotations

import struct

MAX_VARINT32_BYTES = 5
MAX_VARINT64_BYTES = 10

_FIXED32 = struct.Struct("<I")
_FIXED64 = struct.Struct("<Q")


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits a byte, low group first, high bit = more follow."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int, max_bytes: int = MAX_VARINT64_BYTES) -> tuple[int, int]:
    """Decode one varint at ``pos``; at most ``max_bytes`` bytes long."""
    result = 0
    shift = 0
    end = min(len(buf), pos + max_bytes)
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    if end == pos and pos < len(buf):
        raise ValueError(f"varint longer than {max_bytes} bytes")
    raise ValueError("truncated varint")


def decode_varint32(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    value, pos = decode_varint(buf, pos, MAX_VARINT32_BYTES)
    if value > 0xFFFFFFFF:
        raise ValueError(f"varint32 overflows 32 bits: {value}")
    return value, pos


def encode_fixed32(value: int) -> bytes:
    return _FIXED32.pack(value)


def encode_fixed64(value: int) -> bytes:
    return _FIXED64.pack(value)


def decode_fixed32(buf: bytes | memoryview, pos: int = 0) -> int:
    if pos + 4 > len(buf) or pos < 0:
        raise ValueError("truncated fixed32")
    return _FIXED32.unpack_from(buf, pos)[0]


def decode_fixed64(buf: bytes | memoryview, pos: int = 0) -> int:
    if pos + 8 > len(buf) or pos < 0:
        raise ValueError("truncated fixed64")
    return _FIXED64.unpack_from(buf, pos)[0]

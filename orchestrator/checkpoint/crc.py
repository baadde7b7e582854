"""CRC32C (Castagnoli) as TensorFlow stores it: hardware-accelerated, always masked on disk.

TF never stores a raw CRC: ``mask`` rotates and offsets it so that a CRC computed over
bytes that themselves contain CRCs stays well distributed (reference section 2).
"""

from __future__ import annotations

import google_crc32c
import numpy as np

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def crc32c(data) -> int:
    """CRC32C of a bytes-like object (any buffer: bytes, memoryview, numpy array)."""
    return google_crc32c.value(_as_bytes_like(data))


def extend(crc: int, data) -> int:
    """Continue the running CRC ``crc`` over more bytes."""
    return google_crc32c.extend(crc, _as_bytes_like(data))


def mask(crc: int) -> int:
    rotated = ((crc >> 15) | (crc << 17)) & _U32
    return (rotated + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def masked_crc32c(data) -> int:
    return mask(crc32c(data))


def _as_bytes_like(data):
    """A zero-copy view google_crc32c accepts.

    Its C extension only takes buffers that need no release (bytes, numpy arrays), not
    memoryview or bytearray, so other buffers are wrapped in a uint8 numpy view.
    """
    if isinstance(data, bytes):
        return data
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)

"""CRC32C (Castagnoli) as TensorFlow stores it: hardware-accelerated, always masked on disk.

TF never stores a raw CRC: ``mask`` rotates and offsets it so that a CRC computed over
bytes that themselves contain CRCs stays well distributed (reference section 2).

Big buffers are checksummed by the native ``crc32c_extend`` of the libcrc32c that the
google-crc32c wheel bundles, called through ctypes: ctypes releases the GIL during the
call, so a reader's or writer's I/O thread keeps running while the CRC does (the
google_crc32c extension holds the GIL for numpy buffers). The library is found and
checked on a known vector at import; if anything is off, google_crc32c does all the work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import os
from typing import Callable, Iterable, Optional

import google_crc32c
import numpy as np

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
CHECK_VECTOR = (b"123456789", 0xE3069283)  # the CRC-32C catalogue's check value
NATIVE_MIN_BYTES = 64 * 1024  # below this the ctypes call costs more than the GIL it frees

_log = logging.getLogger(__name__)

NativeExtend = Callable[[int, int, int], int]  # (crc, address, nbytes) -> crc


def crc32c(data) -> int:
    """CRC32C of a bytes-like object (any buffer: bytes, memoryview, numpy array)."""
    return extend(0, data)


def extend(crc: int, data) -> int:
    """Continue the running CRC ``crc`` over more bytes."""
    if isinstance(data, bytes) and len(data) < NATIVE_MIN_BYTES:
        return google_crc32c.extend(crc, data)  # the common small case, no view needed
    view = _as_uint8(data)
    if _native_extend is not None and view.nbytes >= NATIVE_MIN_BYTES:
        return _native_extend(crc, view.ctypes.data, view.nbytes)  # `view` keeps the buffer alive
    return google_crc32c.extend(crc, view)


def combine(crc1: int, crc2: int, len2: int, repeated: bool = False) -> int:
    """CRC32C of ``A + B`` from ``crc1 = crc32c(A)``, ``crc2 = crc32c(B)`` and ``len(B)``.

    What lets several threads checksum pieces of one buffer: multiply ``crc1`` by
    x^(8*len2) modulo the polynomial, then add ``crc2`` (zlib's ``crc32_combine``;
    the pre- and post-inversion cancel out). ``repeated=True`` says many combines
    share this ``len2``: lookup tables are built for it once and reused.
    """
    if len2 <= 0:
        return crc1
    if not repeated:
        return _multiply_mod_poly(_x_to_8n(len2), crc1) ^ crc2
    t0, t1, t2, t3 = _shift_tables(len2)
    return t0[crc1 & 0xFF] ^ t1[(crc1 >> 8) & 0xFF] ^ t2[(crc1 >> 16) & 0xFF] ^ t3[crc1 >> 24] ^ crc2


def native_extend() -> Optional[NativeExtend]:
    """The GIL-free native ``crc32c_extend(crc, address, nbytes)``, or None without the library.

    For hot loops over one big buffer that checksum many pieces by address; the caller
    keeps the buffer alive and in bounds.
    """
    return _native_extend


def releases_gil() -> bool:
    """True when big buffers are checksummed without holding the GIL (native library found)."""
    return _native_extend is not None


def mask(crc: int) -> int:
    rotated = ((crc >> 15) | (crc << 17)) & _U32
    return (rotated + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def masked_crc32c(data) -> int:
    return mask(crc32c(data))


_POLY_REFLECTED = 0x82F63B78  # Castagnoli, bit-reversed: bit 31 is x^0
_X0 = 1 << 31  # the polynomial "1" in that representation


def _multiply_mod_poly(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both in reflected bit order."""
    product = 0
    bit = _X0
    while bit and a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY_REFLECTED if b & 1 else b >> 1
    return product


def _powers_of_x() -> list[int]:
    """x^(2^k) modulo the polynomial for k = 0..63 (x^1 is bit 30)."""
    powers = [_X0 >> 1]
    for _ in range(63):
        powers.append(_multiply_mod_poly(powers[-1], powers[-1]))
    return powers


_X_POWERS = _powers_of_x()


@functools.lru_cache(maxsize=1024)
def _x_to_8n(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial; cached, since pieces mostly share a size."""
    result, k, n = _X0, 3, nbytes
    while n:
        if n & 1:
            result = _multiply_mod_poly(_X_POWERS[k], result)  # k < 64: nbytes < 2**61
        n >>= 1
        k += 1
    return result


@functools.lru_cache(maxsize=8)
def _shift_tables(nbytes: int) -> tuple[list[int], ...]:
    """Multiplying by x^(8*nbytes) is linear: four byte tables make it four lookups.

    Built once per length (about 1,000 multiplications); a reader combines many chunk
    CRCs of one length, so each combine then costs well under a microsecond.
    """
    factor = _x_to_8n(nbytes)
    return tuple([_multiply_mod_poly(factor, v << (8 * k)) for v in range(256)] for k in range(4))


def _as_uint8(data) -> np.ndarray:
    """A flat uint8 view of the bytes, zero-copy except for non-contiguous arrays (C order)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


# ---------------------------------------------------------------------------- native library
def library_candidates() -> list[str]:
    """Where libcrc32c may be: bundled next to the google_crc32c package, then the system's."""
    package_dir = os.path.dirname(os.path.abspath(google_crc32c.__file__))
    bundled = sorted(glob.glob(os.path.join(package_dir + ".libs", "libcrc32c*.so*")))
    system = ctypes.util.find_library("crc32c")
    return bundled + ([system] if system else [])


def load_native(candidates: Iterable[str]) -> Optional[NativeExtend]:
    """The first candidate's ``crc32c_extend`` that gives the check value, else None."""
    for path in candidates:
        try:
            function = _bind(path)
            if _native_matches_check_vector(function):
                _log.debug("crc32c: native crc32c_extend from %s (releases the GIL)", path)
                return function
            _log.debug("crc32c: %s gives a wrong check value; not used", path)
        except (OSError, AttributeError, ValueError) as exc:
            _log.debug("crc32c: cannot use %s: %s", path, exc)
    _log.debug("crc32c: no native library; google_crc32c computes every CRC")
    return None


def _bind(path: str) -> NativeExtend:
    function = ctypes.CDLL(path).crc32c_extend
    function.argtypes = (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)
    function.restype = ctypes.c_uint32
    return function


def _native_matches_check_vector(function: NativeExtend) -> bool:
    data, expected = CHECK_VECTOR
    buf = np.frombuffer(data, dtype=np.uint8)
    whole = function(0, buf.ctypes.data, buf.nbytes)
    split = function(function(0, buf.ctypes.data, 4), buf[4:].ctypes.data, buf.nbytes - 4)
    return whole == expected and split == expected and function(0, buf.ctypes.data, 0) == 0


_native_extend: Optional[NativeExtend] = load_native(library_candidates())

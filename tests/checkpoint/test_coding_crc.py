"""Varints, fixed ints and masked CRC32C: the primitives every checkpoint byte depends on."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from orchestrator.checkpoint import coding, crc


@pytest.mark.parametrize("value, encoded", [
    (0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (300, "ac02"),
    (2**32 - 1, "ffffffff0f"), (2**64 - 1, "ffffffffffffffffff01"),
])
def test_varint_known_encodings(value, encoded):
    assert coding.encode_varint(value).hex() == encoded
    assert coding.decode_varint(bytes.fromhex(encoded), 0) == (value, len(encoded) // 2)


@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=4))
def test_varint_round_trip_at_offset(value, prefix):
    buf = prefix + coding.encode_varint(value) + b"tail"
    assert coding.decode_varint(buf, len(prefix)) == (value, len(buf) - 4)


def test_truncated_and_overlong_varints_raise():
    with pytest.raises(ValueError, match="truncated"):
        coding.decode_varint(b"\x80\x80", 0)
    with pytest.raises(ValueError, match="longer than 10"):
        coding.decode_varint(b"\xff" * 11, 0)
    with pytest.raises(ValueError):
        coding.decode_varint32(b"\xff\xff\xff\xff\x1f", 0)  # 2**36 - 1 does not fit 32 bits
    with pytest.raises(ValueError):
        coding.encode_varint(-1)


def test_fixed_ints_are_little_endian():
    assert coding.encode_fixed32(0x01020304) == b"\x04\x03\x02\x01"
    assert coding.encode_fixed64(0xDB4775248B80FB57).hex() == "57fb808b247547db"
    assert coding.decode_fixed32(b"\x00\x04\x03\x02\x01", 1) == 0x01020304
    assert coding.decode_fixed64(bytes.fromhex("57fb808b247547db")) == 0xDB4775248B80FB57
    with pytest.raises(ValueError):
        coding.decode_fixed32(b"\x00\x00\x00", 0)


def test_crc32c_check_value_and_empty_input():
    assert crc.crc32c(b"123456789") == 0xE3069283
    assert crc.crc32c(b"") == 0


def test_mask_matches_reference_and_inverts():
    assert crc.mask(0) == 0xA282EAD8
    # the reference's test vector: float32 [1.0, 2.0] stores crc32c=0x35e53c59
    assert crc.masked_crc32c(np.array([1.0, 2.0], np.float32)) == 0x35E53C59


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_unmask_inverts_mask(value):
    assert crc.unmask(crc.mask(value)) == value


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_extend_equals_crc_of_concatenation(a, b):
    assert crc.extend(crc.crc32c(a), b) == crc.crc32c(a + b)


def test_crc_accepts_every_buffer_kind_without_changing_the_value():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    expected = crc.crc32c(array.tobytes())
    assert crc.crc32c(array) == expected
    assert crc.crc32c(memoryview(array.tobytes())) == expected
    assert crc.crc32c(bytearray(array.tobytes())) == expected
    assert crc.crc32c(array.T) == crc.crc32c(array.T.tobytes())  # non-contiguous: C-order bytes

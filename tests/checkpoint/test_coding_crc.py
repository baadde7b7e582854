"""Varints, fixed ints and masked CRC32C: the primitives every checkpoint byte depends on."""

import ctypes.util
import glob
import os
import subprocess
import sys
import threading
import time

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, strategies as st

from orchestrator.checkpoint import coding, crc, reader
from orchestrator.checkpoint.errors import CRCMismatchError
from orchestrator.checkpoint.reader import load_checkpoint
from orchestrator.checkpoint.writer import write_checkpoint


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


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combine_gives_the_crc_of_the_concatenation(a, b):
    assert crc.combine(crc.crc32c(a), crc.crc32c(b), len(b)) == crc.crc32c(a + b)


def test_combine_over_big_and_odd_lengths():
    rng = np.random.default_rng(4)
    for len_a, len_b in [(0, 2**20), (2**20, 0), (3, 2**24 + 7), (2**22 + 1, 65537)]:
        a = rng.integers(0, 256, len_a, dtype=np.uint8)
        b = rng.integers(0, 256, len_b, dtype=np.uint8)
        expected = crc.crc32c(np.concatenate([a, b]))
        assert crc.combine(crc.crc32c(a), crc.crc32c(b), len_b) == expected, (len_a, len_b)


def test_crc_accepts_every_buffer_kind_without_changing_the_value():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    expected = crc.crc32c(array.tobytes())
    assert crc.crc32c(array) == expected
    assert crc.crc32c(memoryview(array.tobytes())) == expected
    assert crc.crc32c(bytearray(array.tobytes())) == expected
    assert crc.crc32c(array.T) == crc.crc32c(array.T.tobytes())  # non-contiguous: C-order bytes


# ---------------------------------------------------------------------------- native (GIL-free) CRC path
SIZES = [0, 1, 3, 8, 63, 4095, crc.NATIVE_MIN_BYTES - 1, crc.NATIVE_MIN_BYTES, crc.NATIVE_MIN_BYTES + 7,
         2**20 + 13, 3 * 2**20 + 1]


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_native_library_is_found_where_the_wheel_bundles_it():
    if not glob.glob(os.path.join(os.path.dirname(google_crc32c.__file__) + ".libs", "libcrc32c*.so*")):
        pytest.skip("this google-crc32c install bundles no libcrc32c")
    assert crc.releases_gil()
    assert crc.load_native(crc.library_candidates()) is not None


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("start", [0, 1, 3])  # unaligned views into the same buffer
def test_crc_equals_google_crc32c_for_every_size_and_alignment(size, start):
    data = _random_bytes(size + start, seed=size)
    expected = google_crc32c.value(data[start:])
    array = np.frombuffer(data, dtype=np.uint8)[start:]
    assert crc.crc32c(array) == expected
    assert crc.crc32c(data[start:]) == expected
    assert crc.crc32c(memoryview(data)[start:]) == expected
    assert crc.extend(crc.crc32c(array[:size // 3]), array[size // 3:]) == expected


def test_native_function_equals_google_crc32c_directly():
    """The bound function itself, on sizes both sides of the threshold, continuing a CRC."""
    native = crc.load_native(crc.library_candidates())
    if native is None:
        pytest.skip("no native libcrc32c on this machine")
    for size in SIZES:
        buf = np.frombuffer(_random_bytes(size + 5, seed=size + 1), dtype=np.uint8)[5:]
        assert native(0x12345678, buf.ctypes.data, buf.nbytes) == google_crc32c.extend(0x12345678, buf.tobytes())


def test_float_tensor_views_checksum_their_bytes():
    array = np.random.default_rng(1).standard_normal((300, 301)).astype(np.float32)  # 361 KB
    assert crc.crc32c(array) == google_crc32c.value(array.tobytes())
    assert crc.crc32c(array[:, 1:]) == google_crc32c.value(np.ascontiguousarray(array[:, 1:]).tobytes())


def test_unusable_libraries_are_rejected_quietly(tmp_path):
    not_a_library = tmp_path / "libcrc32c.so.1"
    not_a_library.write_bytes(b"\x7fELF but not really")
    candidates = [str(tmp_path / "missing.so"), str(not_a_library)]
    libm = ctypes.util.find_library("m")
    if libm:
        candidates.append(libm)  # loads, but has no crc32c_extend
    assert crc.load_native(candidates) is None
    assert crc.load_native([]) is None


def test_a_library_giving_wrong_values_is_rejected():
    assert not crc._native_matches_check_vector(lambda c, address, n: 0)
    assert not crc._native_matches_check_vector(lambda c, address, n: 0xE3069283)  # ignores the split


def test_fallback_without_native_library_gives_the_same_values(monkeypatch):
    big = np.frombuffer(_random_bytes(2**20 + 3, seed=7), dtype=np.uint8)
    with_native = crc.crc32c(big), crc.extend(5, big[1:]), crc.masked_crc32c(big)
    monkeypatch.setattr(crc, "_native_extend", None)
    assert not crc.releases_gil()
    assert (crc.crc32c(big), crc.extend(5, big[1:]), crc.masked_crc32c(big)) == with_native
    assert crc.crc32c(b"123456789") == 0xE3069283


def test_import_falls_back_when_no_library_is_found():
    """A fresh interpreter where no candidate exists still imports and checksums correctly."""
    code = (
        "import ctypes.util, glob\n"
        "glob.glob = lambda pattern: []\n"
        "ctypes.util.find_library = lambda name: None\n"
        "from orchestrator.checkpoint import crc\n"
        "assert not crc.releases_gil()\n"
        "assert crc.crc32c(b'123456789') == 0xE3069283\n"
        "assert crc.crc32c(bytes(2**20)) == 0x" + f"{google_crc32c.value(bytes(2**20)):08x}\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _longest_pause_of_a_python_thread_during(work) -> float:
    """Seconds of the longest stall of a pure-Python loop while ``work`` runs on another thread."""
    finished = threading.Event()
    thread = threading.Thread(target=lambda: (work(), finished.set()))
    last, longest = time.perf_counter(), 0.0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # GIL hand-overs every 0.5 ms, so a pause means the GIL was held
    try:
        thread.start()
        while not finished.is_set():
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        thread.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    return longest


def test_native_crc_lets_other_python_threads_run(monkeypatch):
    """What the reader's overlap relies on: a big CRC does not hold the GIL."""
    if not crc.releases_gil():
        pytest.skip("no native libcrc32c on this machine")
    big = np.ones(256 * 2**20, dtype=np.uint8)
    native = crc._native_extend
    monkeypatch.setattr(crc, "_native_extend", None)
    held_pause = _longest_pause_of_a_python_thread_during(lambda: crc.crc32c(big))  # >= the whole CRC
    monkeypatch.setattr(crc, "_native_extend", native)
    native_pauses = []
    for _ in range(5):  # other processes may preempt this thread too: one clean run suffices
        native_pauses.append(_longest_pause_of_a_python_thread_during(lambda: crc.crc32c(big)))
        if native_pauses[-1] < 0.5 * held_pause:
            break
    assert min(native_pauses) < 0.5 * held_pause, (native_pauses, held_pause)


# ---------------------------------------------------------------------------- the reader's checksummed read
@pytest.mark.parametrize("chunk", [4096 + 17, 65536 * 3 + 1])
def test_chunked_local_read_matches_and_detects_a_late_flipped_bit(tmp_path, monkeypatch, chunk):
    """Many small chunks: the helper checksums some, the reader takes back the rest, in order."""
    monkeypatch.setattr(reader, "READ_CHUNK", chunk)
    value = np.random.default_rng(3).standard_normal(3 * 2**20 // 4 + 5).astype(np.float32)
    prefix = write_checkpoint(str(tmp_path / "ckpt"), {"w": value})
    for _ in range(3):
        np.testing.assert_array_equal(load_checkpoint(prefix).get_tensor("w"), value)
    entry = load_checkpoint(prefix).entry("w")
    with open(prefix + ".data-00000-of-00001", "r+b") as f:  # flip a bit near the end
        f.seek(entry.offset + entry.size - 10)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x01]))
    with pytest.raises(CRCMismatchError, match="'w'"):
        load_checkpoint(prefix).get_tensor("w")

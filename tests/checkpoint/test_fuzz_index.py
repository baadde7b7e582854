"""Fuzzing the index parser: any input raises only CheckpointError subclasses, quickly,
without allocating more than the files could hold.

Three kinds of input: random bytes; a valid index with bytes flipped, cut or inserted;
and, to get past the checksums, valid-CRC tables whose block contents or entry values
are garbage. Each is read through the real ``CheckpointReader`` over a ``memory://``
file next to a real data file, and every tensor it lists is read.
"""

import tracemalloc
import uuid

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from orchestrator.checkpoint import bundle, coding, crc, reader, table, writer
from orchestrator.checkpoint.errors import CheckpointError
from orchestrator.checkpoint.storage import Storage

PEAK_LIMIT = 16 * 1024 * 1024
FUZZ = settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

ROOT = f"memory://fuzz-{uuid.uuid4().hex[:8]}"
TENSORS = {
    "a": np.arange(64, dtype=np.float32),
    "b/strings": np.array([b"x", b"\x00yz", b""], dtype=object),
    "c": np.int64(7),
    "e": np.zeros((0, 3), np.int16),
}


def _base_checkpoint():
    prefix = writer.write_checkpoint(f"{ROOT}/base", TENSORS)
    storage, _ = Storage.for_path(prefix)
    slice_writer = bundle.ShardWriter(f"{ROOT}/sliced", 0, 1, storage)
    slice_writer.add_slice("p", (6, 2), (0, 0), (3, 2), np.ones((3, 2), np.float32))
    slice_writer.add_slice("p", (6, 2), (3, 0), (3, 2), np.zeros((3, 2), np.float32))
    result = slice_writer.finish()
    entries = {**bundle.merge_results([result])[0]}
    base_entries = dict(table.Table(storage.read_bytes(prefix + ".index"), "base").items())
    return storage, storage.read_bytes(bundle.data_filename(prefix, 0, 1)), base_entries, entries


STORAGE, DATA, BASE_ENTRIES, SLICED_ENTRIES = _base_checkpoint()
VALID_INDEX = table.build_table(sorted(BASE_ENTRIES.items()))


def _read_everything(index_bytes: bytes, data: bytes = DATA) -> None:
    prefix = f"{ROOT}/case"
    STORAGE.write_bytes(prefix + ".index", index_bytes)
    STORAGE.write_bytes(bundle.data_filename(prefix, 0, 1), data)
    r = reader.CheckpointReader(prefix)
    r.get_variable_to_shape_map()
    for name in r.keys():
        r.get_tensor(name)


def _only_typed_errors(index_bytes: bytes, data: bytes = DATA) -> None:
    tracemalloc.start()
    try:
        _read_everything(index_bytes, data)
    except CheckpointError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"parser allocated {peak} bytes for a {len(index_bytes)}-byte index"


def _block(contents: bytes) -> bytes:
    return contents + b"\x00" + coding.encode_fixed32(crc.mask(crc.extend(crc.crc32c(contents), b"\x00")))


def _table_from_block(data_block: bytes) -> bytes:
    """A table whose one data block holds ``data_block`` verbatim, all checksums valid."""
    out = _block(data_block)
    meta = table.BlockHandle(len(out), 8)
    out += _block(table.BlockBuilder(1).finish())
    index_builder = table.BlockBuilder(1)
    index_builder.add(b"\xff" * 8, table.BlockHandle(0, len(data_block)).encode())
    index_contents = index_builder.finish()
    index = table.BlockHandle(len(out), len(index_contents))
    out += _block(index_contents)
    handles = meta.encode() + index.encode()
    return out + handles + bytes(40 - len(handles)) + coding.encode_fixed64(table.MAGIC)


def test_the_unmutated_inputs_read_cleanly():
    _read_everything(VALID_INDEX)
    _read_everything(_table_from_block(_first_block_contents()))


def _first_block_contents() -> bytes:
    builder = table.BlockBuilder(16)
    for key, value in sorted(BASE_ENTRIES.items()):
        builder.add(key, value)
    return builder.finish()


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data):
    _only_typed_errors(data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_with_a_valid_magic(data):
    _only_typed_errors(data + coding.encode_fixed64(table.MAGIC))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_INDEX) - 1), st.integers(1, 255)), min_size=1, max_size=6),
       st.integers(0, len(VALID_INDEX)))
def test_flipped_and_truncated_valid_index(flips, keep):
    damaged = bytearray(VALID_INDEX)
    for pos, xor in flips:
        damaged[pos] ^= xor
    _only_typed_errors(bytes(damaged[:keep]))
    _only_typed_errors(bytes(damaged))


@FUZZ
@given(st.integers(0, len(VALID_INDEX)), st.binary(min_size=1, max_size=30))
def test_bytes_inserted_into_valid_index(pos, extra):
    _only_typed_errors(VALID_INDEX[:pos] + extra + VALID_INDEX[pos:])


BLOCK = _first_block_contents()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(BLOCK) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_garbled_block_contents_with_valid_checksums(flips):
    garbled = bytearray(BLOCK)
    for pos, xor in flips:
        garbled[pos] ^= xor
    _only_typed_errors(_table_from_block(bytes(garbled)))


@FUZZ
@given(st.binary(max_size=300))
def test_random_block_contents_with_valid_checksums(contents):
    _only_typed_errors(_table_from_block(contents))


ENTRY_KEYS = sorted(k for k in BASE_ENTRIES if k) + sorted(bundle.key_bytes(k) for k in SLICED_ENTRIES)


@FUZZ
@given(st.sampled_from(ENTRY_KEYS), st.binary(max_size=60))
def test_garbage_entry_values_in_a_valid_table(key, value):
    entries = {**BASE_ENTRIES, **{bundle.key_bytes(k): v for k, v in SLICED_ENTRIES.items()}}
    entries[key] = value
    _only_typed_errors(table.build_table(sorted(entries.items())))


@FUZZ
@given(st.sampled_from(ENTRY_KEYS), st.sampled_from(["shard_id", "offset", "size", "dtype", "crc32c"]),
       st.integers(-(2**31), 2**31 - 1), st.lists(st.integers(0, 2**62), max_size=4))
def test_forged_entry_fields_in_a_valid_table(key, field, value, dims):
    from orchestrator.checkpoint.protos import BundleEntryProto

    entries = {**BASE_ENTRIES, **{bundle.key_bytes(k): v for k, v in SLICED_ENTRIES.items()}}
    entry = BundleEntryProto.FromString(entries[key])
    setattr(entry, field, value if field not in ("crc32c",) else value & 0xFFFFFFFF)
    if dims:
        del entry.shape.dim[:]
        for d in dims:
            entry.shape.dim.add(size=d)
    entries[key] = entry.SerializeToString()
    _only_typed_errors(table.build_table(sorted(entries.items())))


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    fs = fsspec.filesystem("memory")
    if fs.exists(ROOT):
        fs.rm(ROOT, recursive=True)

"""One round-trip suite, run against local disk, memory:// and s3:// (a real moto server).

Each round-trip test takes ``any_root`` (tests/conftest.py), so the same checks prove
the format library behaves identically on every backend: values bit-exact, shards,
slices, the state file, and range reads that fetch only the tensor asked for. The last
test is local-only: big tensors there take a chunked read path of their own.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import pytest

from orchestrator.checkpoint import bundle
from orchestrator.checkpoint.errors import CRCMismatchError
from orchestrator.checkpoint.reader import list_variables, load_checkpoint
from orchestrator.checkpoint.state import get_checkpoint_state, latest_checkpoint, update_checkpoint_state
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.writer import write_checkpoint

TENSOR_BYTES = 256 * 1024  # each tensor of the range-read checkpoint
TENSOR_COUNT = 8


def payload(value) -> tuple[str, tuple[int, ...], object]:
    """(dtype, shape, bytes) of a tensor; strings as a list of bytes."""
    array = np.asarray(value)
    if array.dtype == object:
        return "string", array.shape, [bytes(x) for x in array.ravel()]
    return array.dtype.name, array.shape, array.tobytes()


def sample_tensors() -> dict[str, np.ndarray]:
    """Several dtypes, NaN payloads, strings with NUL/non-ASCII, 0-d and empty tensors."""
    return {
        "dense/kernel": np.arange(24, dtype=np.float32).reshape(4, 6) / 3,
        "dense/bias": np.array([0x7FC00001, 0xFF800000], np.uint32).view(np.float32),
        "half": np.array([0.5, -0.0, np.inf], np.float16),
        "bf16": np.array([1.0, -3.5, np.nan], ml_dtypes.bfloat16),
        "f64": np.linspace(-1, 1, 9).reshape(3, 3),
        "i8": np.array([-128, 127, 0], np.int8),
        "u64": np.array([2**64 - 1, 0], np.uint64),
        "i64/scalar": np.array(-(2**63), np.int64),
        "flags": np.array([True, False, True]),
        "c128": np.array([1 + 1j, complex(np.nan, 2)], np.complex128),
        "empty": np.zeros((0, 3), np.float32),
        "names": np.array([b"a\x00b", "日本".encode(), b"", b"\xff"], dtype=object),
        "name/scalar": np.array(b"only\x00one", dtype=object),
        "names/empty": np.zeros((0,), dtype=object),
    }


def assert_round_trip(prefix, tensors, options) -> None:
    reader = load_checkpoint(prefix, storage_options=options)
    assert {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()} == {
        k: v.shape for k, v in tensors.items()}
    for name, expected in tensors.items():
        assert reader.has_tensor(name)
        assert payload(reader.get_tensor(name)) == payload(expected), name
        assert np.dtype(reader.get_variable_to_dtype_map()[name]) == expected.dtype, name  # strings: object
    assert not reader.has_tensor("no/such/tensor")
    together = reader.get_tensors()  # the batched read a restore uses: same values
    assert list(together) == reader.keys()
    for name, expected in tensors.items():
        assert payload(together[name]) == payload(expected), name
    reader.verify()


@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_all_kinds(any_root, num_shards):
    root, options = any_root
    storage, base = Storage.for_path(root, options)
    tensors = sample_tensors()
    prefix = write_checkpoint(storage.join(base, "model"), tensors, num_shards=num_shards,
                              storage_options=options)
    files = storage.glob(prefix + ".data-*")
    assert [storage.basename(f) for f in files] == [
        f"model.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    assert storage.exists(prefix + ".index")
    assert_round_trip(prefix, tensors, options)
    assert sorted((n, tuple(s)) for n, s in list_variables(prefix, storage_options=options)) == sorted(
        (n, v.shape) for n, v in tensors.items())


def test_round_trip_sliced_across_shards(any_root):
    root, options = any_root
    storage, base = Storage.for_path(root, options)
    prefix = storage.join(base, "sliced")
    full = np.arange(40, dtype=np.float64).reshape(10, 4) * 1.5
    grid = np.arange(36, dtype=np.int32).reshape(6, 6)
    writers = [bundle.ShardWriter(prefix, i, 3, storage) for i in range(3)]
    for shard, (start, length) in enumerate([(0, 4), (4, 3), (7, 3)]):
        writers[shard].add_slice("emb", (10, 4), (start, 0), (length, 4), full[start:start + length])
    writers[2].add_slice("grid", (6, 6), (0, 0), (6, 2), np.ascontiguousarray(grid[:, :2]))
    writers[0].add_slice("grid", (6, 6), (0, 2), (6, 4), np.ascontiguousarray(grid[:, 2:]))
    writers[1].add("step", np.array(9, np.int64))
    bundle.write_index(prefix, [w.finish() for w in writers], storage)
    assert_round_trip(prefix, {"emb": full, "grid": grid, "step": np.array(9, np.int64)}, options)


def test_state_file_latest_and_load_directory(any_root):
    root, options = any_root
    storage, base = Storage.for_path(root, options)
    assert get_checkpoint_state(base, storage_options=options) is None
    assert latest_checkpoint(base, storage_options=options) is None
    for step in (1, 2, 3):
        write_checkpoint(storage.join(base, f"ckpt-{step}"), {"step": np.array(step, np.int64)},
                         storage_options=options)
    update_checkpoint_state(base, "ckpt-3", ["ckpt-2", "ckpt-3"],
                            all_model_checkpoint_timestamps=[100.5, 200.25], last_preserved_timestamp=50.0,
                            storage_options=options)
    text = storage.read_bytes(storage.join(base, "checkpoint")).decode()
    assert 'model_checkpoint_path: "ckpt-3"' in text
    state = get_checkpoint_state(base, storage_options=options)
    assert state.model_checkpoint_path == storage.join(base, "ckpt-3")
    assert list(state.all_model_checkpoint_paths) == [storage.join(base, f"ckpt-{s}") for s in (2, 3)]
    assert list(state.all_model_checkpoint_timestamps) == [100.5, 200.25]
    assert state.last_preserved_timestamp == 50.0
    assert latest_checkpoint(base, storage_options=options) == storage.join(base, "ckpt-3")
    assert int(load_checkpoint(base, storage_options=options).get_tensor("step")) == 3


def test_latest_checkpoint_ignores_state_pointing_at_missing_index(any_root):
    root, options = any_root
    storage, base = Storage.for_path(root, options)
    write_checkpoint(storage.join(base, "ckpt-1"), {"step": np.array(1, np.int64)}, storage_options=options)
    update_checkpoint_state(base, "ckpt-2", ["ckpt-1", "ckpt-2"], storage_options=options)
    assert latest_checkpoint(base, storage_options=options) is None


class ReadCounter:
    """Counts the bytes the checkpoint code pulls through ``Storage``, per file."""

    def __init__(self, monkeypatch):
        self.by_file: collections.Counter[str] = collections.Counter()
        self._wrap(monkeypatch, "read_ranges", lambda args, out: [(r[0], len(b)) for r, b in zip(args[0], out)])
        self._wrap(monkeypatch, "read_bytes", lambda args, out: [(args[0], len(out))])
        original_open = Storage.open_local
        counter = self

        def open_local(storage, path, *args, **kwargs):
            return _CountingFile(original_open(storage, path, *args, **kwargs), path, counter)

        monkeypatch.setattr(Storage, "open_local", open_local)

    def _wrap(self, monkeypatch, method, measure):
        original = getattr(Storage, method)

        def counted(storage, *args, **kwargs):
            out = original(storage, *args, **kwargs)
            for path, nbytes in measure(args, out):
                self.by_file[path] += nbytes
            return out

        monkeypatch.setattr(Storage, method, counted)

    def data_bytes(self) -> int:
        return sum(n for path, n in self.by_file.items() if ".data-" in path)


class _CountingFile:
    """An open local file that charges every byte it hands back to the reader."""

    def __init__(self, inner, path, counter):
        self._inner, self._path, self._counter = inner, path, counter
        self.size = inner.size

    def readinto(self, offset, view):
        n = self._inner.readinto(offset, view)
        self._counter.by_file[self._path] += n
        return n

    def close(self):
        self._inner.close()


def test_reading_one_tensor_fetches_only_its_bytes(any_root, monkeypatch):
    root, options = any_root
    storage, base = Storage.for_path(root, options)
    rng = np.random.default_rng(3)
    tensors = {f"layer_{i}": rng.standard_normal(TENSOR_BYTES // 4).astype(np.float32)
               for i in range(TENSOR_COUNT)}
    prefix = write_checkpoint(storage.join(base, "big"), tensors, num_shards=2, storage_options=options)
    counter = ReadCounter(monkeypatch)
    reader = load_checkpoint(prefix, storage_options=options)
    assert counter.data_bytes() == 0, f"opening read data bytes: {dict(counter.by_file)}"
    value = reader.get_tensor("layer_5")
    np.testing.assert_array_equal(value, tensors["layer_5"])
    assert TENSOR_BYTES <= counter.data_bytes() <= TENSOR_BYTES + 4096, dict(counter.by_file)
    reader.get_tensor("layer_2")
    assert 2 * TENSOR_BYTES <= counter.data_bytes() <= 2 * (TENSOR_BYTES + 4096), dict(counter.by_file)


def test_big_local_tensor_reads_exactly_its_bytes_and_catches_a_flipped_bit(tmp_path, monkeypatch):
    """Tensors over 16 MiB take the chunked read path (I/O overlapped with the CRC)."""
    big = np.random.default_rng(5).standard_normal(17 * 2**18 + 1).astype(np.float32)  # 17 MiB + 4 B
    tensors = {"a": np.arange(10, dtype=np.int64), "big": big, "z": np.ones(3, np.float32)}
    prefix = write_checkpoint(str(tmp_path / "big"), tensors)
    counter = ReadCounter(monkeypatch)
    reader = load_checkpoint(prefix)
    np.testing.assert_array_equal(reader.get_tensor("big"), big)
    assert big.nbytes <= counter.data_bytes() <= big.nbytes + 4096, dict(counter.by_file)

    entry = reader.entry("big")
    with open(prefix + ".data-00000-of-00001", "r+b") as f:  # flip one bit in the 2nd chunk
        f.seek(entry.offset + 9 * 2**20 + 3)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(CRCMismatchError, match="big"):
        load_checkpoint(prefix).get_tensor("big")
    np.testing.assert_array_equal(load_checkpoint(prefix).get_tensor("z"), tensors["z"])

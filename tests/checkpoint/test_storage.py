"""Storage: the fsspec wrapper behaves the same on local disk, memory:// and s3://."""

import os

import numpy as np
import pytest

from orchestrator.checkpoint import storage as storage_module
from orchestrator.checkpoint.storage import TEMP_MARKER, Storage


def test_write_read_range_and_glob(any_root):
    root, options = any_root
    storage, base = Storage.for_path(root, options)
    path = storage.join(base, "a.bin")
    storage.write_bytes(path, b"0123456789")
    assert storage.read_bytes(path) == b"0123456789"
    assert storage.read_ranges([(path, 3, 4), (path, 0, 0), (path, 8, 5)]) == [b"3456", b"", b"89"]
    assert storage.size(path) == 10
    assert storage.glob(storage.join(base, "*.bin")) == [path]
    storage.rm(path)
    assert not storage.exists(path)


def test_failed_atomic_write_leaves_nothing(any_root):
    root, options = any_root
    storage, base = Storage.for_path(root, options)
    path = storage.join(base, "b.bin")
    storage.write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with storage.write_atomic(path) as f:
            f.write(b"partial new content")
            raise RuntimeError("disk on fire")
    assert storage.read_bytes(path) == b"old"
    leftovers = [p for p in storage.listdir(base) if TEMP_MARKER in p]
    assert leftovers == []


def test_local_write_is_atomic_rename(tmp_path):
    storage, base = Storage.for_path(str(tmp_path))
    assert storage.has_atomic_rename and storage.is_local
    s3, _ = Storage.for_path("s3://bucket/x", {"anon": True})
    assert not s3.has_atomic_rename


@pytest.mark.skipif(storage_module._sync_file_range is None, reason="sync_file_range is Linux-only")
def test_local_writes_start_writeback_of_each_finished_range(tmp_path, monkeypatch):
    """A fsync'd local write hands its bytes to the disk as it goes, not all at the closing fsync."""
    calls = []
    real = storage_module._sync_file_range

    def recording(fd, offset, nbytes, flags):
        calls.append((offset, nbytes, os.fstat(fd).st_size))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(storage_module, "_sync_file_range", recording)
    monkeypatch.setattr(storage_module, "WRITEBACK_BYTES", 1 << 20)
    data = np.random.default_rng(0).integers(0, 256, (5 << 20) + 123, dtype=np.uint8)
    storage, base = Storage.for_path(str(tmp_path))
    path = storage.join(base, "big.bin")
    with storage.write_atomic(path) as f:
        for start in range(0, data.nbytes, 300_000):
            f.write(data[start:start + 300_000])
    assert storage.read_bytes(path) == data.tobytes()
    assert len(calls) == 4  # every 4 writes of 300,000 B pass 1 MiB; the last 443,003 B wait for the fsync
    covered = 0
    for offset, nbytes, size_then in calls:
        assert offset == covered and nbytes >= 1 << 20
        assert size_then >= offset + nbytes  # only bytes already in the file
        covered += nbytes
    assert covered == 4 * 1_200_000


def test_writeback_a_file_cannot_take_is_skipped_and_the_write_completes(tmp_path, monkeypatch):
    """sync_file_range refuses pipes (ESPIPE): the writer carries on without it."""
    read_end, write_end = os.pipe()
    monkeypatch.setattr(storage_module, "WRITEBACK_BYTES", 16)
    with os.fdopen(write_end, "wb", buffering=0) as pipe:
        f = storage_module._EagerWriteback(pipe)
        f.write(b"x" * 20)
        f.write(b"y" * 20)
    assert os.read(read_end, 100) == b"x" * 20 + b"y" * 20
    os.close(read_end)


def test_unsynced_writes_skip_writeback(tmp_path):
    storage, base = Storage.for_path(str(tmp_path), fsync=False)
    with storage.write_atomic(storage.join(base, "c.bin")) as f:
        assert not isinstance(f, storage_module._EagerWriteback)
        f.write(b"abc")
    assert storage.read_bytes(storage.join(base, "c.bin")) == b"abc"

"""Storage: the fsspec wrapper behaves the same on local disk, memory:// and s3://."""

import pytest

from orchestrator.checkpoint.storage import TEMP_MARKER, Storage


def test_write_read_range_and_glob(any_root):
    root, options = any_root
    storage, base = Storage.for_path(root, options)
    path = storage.join(base, "a.bin")
    storage.write_bytes(path, b"0123456789")
    assert storage.read_bytes(path) == b"0123456789"
    assert storage.read_range(path, 3, 4) == b"3456"
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

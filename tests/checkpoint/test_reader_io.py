"""How the reader gets bytes off local disk: open files kept, chunks split over threads."""

import os
import threading

import numpy as np
import pytest

from orchestrator.checkpoint import reader
from orchestrator.checkpoint.errors import CheckpointNotFoundError, CorruptCheckpointError, CRCMismatchError
from orchestrator.checkpoint.reader import load_checkpoint
from orchestrator.checkpoint.storage import LocalFile
from orchestrator.checkpoint.writer import write_checkpoint
from tests.checkpoint.test_backends import ReadCounter

CHUNK = 64 * 1024 + 5  # odd on purpose: chunk CRCs of unequal, unaligned lengths get combined


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(reader, "READ_CHUNK", CHUNK)


@pytest.fixture
def tensors():
    rng = np.random.default_rng(11)
    return {f"t{i}": rng.standard_normal(int(CHUNK * (2 + i) / 4) + i).astype(np.float32) for i in range(6)}


def _open_fds_to(path: str) -> int:
    fd_dir = "/proc/self/fd"
    count = 0
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, name)) == path:
                count += 1
        except OSError:
            pass
    return count


def _flip_byte(path: str, position: int, mask: int = 0x04) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ mask]))


def test_threads_reading_one_reader_at_once_all_get_exact_values(tmp_path, small_chunks, tensors):
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors, num_shards=2)
    ckpt = load_checkpoint(prefix)
    failures, barrier = [], threading.Barrier(4)

    def read_all(seed):
        barrier.wait(timeout=30)
        names = list(tensors)
        np.random.default_rng(seed).shuffle(names)
        for _ in range(5):
            for name in names:
                if not np.array_equal(ckpt.get_tensor(name), tensors[name]):
                    failures.append(name)

    threads = [threading.Thread(target=read_all, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_a_flipped_bit_in_any_chunk_is_caught(tmp_path, small_chunks):
    value = np.random.default_rng(2).integers(0, 2**31, 5 * CHUNK // 4 + 3, dtype=np.int32)
    prefix = write_checkpoint(str(tmp_path / "ckpt"), {"w": value})
    entry = load_checkpoint(prefix).entry("w")
    data_path = prefix + ".data-00000-of-00001"
    for where in (0, CHUNK - 1, CHUNK, 3 * CHUNK + 17, entry.size - 1):
        _flip_byte(data_path, entry.offset + where, 0x80)
        with pytest.raises(CRCMismatchError, match="'w'"):
            load_checkpoint(prefix).get_tensor("w")
        _flip_byte(data_path, entry.offset + where, 0x80)  # put it back: the next position starts clean
        np.testing.assert_array_equal(load_checkpoint(prefix).get_tensor("w"), value)


def test_a_failing_read_in_any_thread_surfaces_and_the_next_read_works(tmp_path, small_chunks, monkeypatch):
    value = np.arange(4 * CHUNK // 8, dtype=np.float64)
    prefix = write_checkpoint(str(tmp_path / "ckpt"), {"w": value})
    original = LocalFile.readinto
    entry = load_checkpoint(prefix).entry("w")

    def failing(self, offset, view):
        if offset >= entry.offset + 2 * CHUNK:  # whichever thread claims the third chunk fails
            raise OSError(5, "Input/output error")
        return original(self, offset, view)

    monkeypatch.setattr(LocalFile, "readinto", failing)
    with pytest.raises(OSError, match="Input/output error"):
        load_checkpoint(prefix).get_tensor("w")
    monkeypatch.setattr(LocalFile, "readinto", original)
    np.testing.assert_array_equal(load_checkpoint(prefix).get_tensor("w"), value)


def test_data_files_stay_open_until_close(tmp_path, tensors):
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors)
    data_path = prefix + ".data-00000-of-00001"
    with load_checkpoint(prefix) as ckpt:
        assert _open_fds_to(data_path) == 0  # opening reads only the index
        for name in tensors:
            ckpt.get_tensor(name)
        assert _open_fds_to(data_path) == 1  # one descriptor for every tensor of the shard
    assert _open_fds_to(data_path) == 0
    with pytest.raises(ValueError, match="closed"):
        ckpt.get_tensor("t0")


def test_a_dropped_reader_releases_its_files(tmp_path, tensors):
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors)
    data_path = prefix + ".data-00000-of-00001"
    ckpt = load_checkpoint(prefix)
    ckpt.get_tensor("t1")
    assert _open_fds_to(data_path) == 1
    del ckpt
    assert _open_fds_to(data_path) == 0


def test_an_open_reader_keeps_reading_after_retention_deletes_the_files(tmp_path, tensors):
    """Once a shard is open, deleting the checkpoint (max_to_keep) does not break a restore in progress."""
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors)
    ckpt = load_checkpoint(prefix)
    ckpt.get_tensor("t0")
    for path in (prefix + ".index", prefix + ".data-00000-of-00001"):
        os.remove(path)
    for name, value in tensors.items():
        np.testing.assert_array_equal(ckpt.get_tensor(name), value)
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint(prefix)


def test_local_file_reads_at_offsets_and_stops_at_the_end(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with LocalFile(str(path)) as f:
        assert f.size == 1024
        out = bytearray(10)
        assert f.readinto(300, memoryview(out)) == 10 and bytes(out) == bytes(range(44, 54))
        tail = bytearray(50)
        assert f.readinto(1000, memoryview(tail)) == 24  # short only at end of file
        assert f.readinto(5000, memoryview(tail)) == 0
    with pytest.raises(FileNotFoundError):
        LocalFile(str(tmp_path / "missing.bin"))


# ---------------------------------------------------------------------------- get_tensors
def test_get_tensors_reads_each_stored_byte_once(tmp_path, small_chunks, tensors, monkeypatch):
    tensors = dict(tensors, label=np.array([b"x", b"yz"], dtype=object), step=np.array(7, np.int64))
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors, num_shards=3)
    ckpt = load_checkpoint(prefix)
    counter = ReadCounter(monkeypatch)
    values = ckpt.get_tensors()
    assert list(values) == ckpt.keys()
    for name, expected in tensors.items():
        assert values[name].dtype == expected.dtype and values[name].shape == expected.shape
        assert values[name].tolist() == expected.tolist(), name
    assert counter.data_bytes() == sum(ckpt.stored_nbytes(n) for n in tensors)


def test_get_tensors_of_a_subset_keeps_the_asked_order_once_each(tmp_path, tensors, monkeypatch):
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors)
    ckpt = load_checkpoint(prefix)
    counter = ReadCounter(monkeypatch)
    values = ckpt.get_tensors(["t4", "t1", "t4"])
    assert list(values) == ["t4", "t1"]
    np.testing.assert_array_equal(values["t4"], tensors["t4"])
    assert counter.data_bytes() == tensors["t4"].nbytes + tensors["t1"].nbytes


def test_get_tensors_checks_every_name_and_bound_before_reading(tmp_path, tensors, monkeypatch):
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors)
    ckpt = load_checkpoint(prefix)
    counter = ReadCounter(monkeypatch)
    with pytest.raises(CheckpointNotFoundError, match="'nope'"):
        ckpt.get_tensors(["t0", "nope"])
    data_path = prefix + ".data-00000-of-00001"
    last = max(tensors, key=lambda n: ckpt.entry(n).offset)
    with open(data_path, "r+b") as f:
        f.truncate(ckpt.entry(last).offset + 8)
    with pytest.raises(CorruptCheckpointError, match=f"'{last}'.*beyond the file"):
        load_checkpoint(prefix).get_tensors()
    assert counter.data_bytes() == 0


def test_get_tensors_names_the_tensor_whose_bytes_are_damaged(tmp_path, small_chunks, tensors):
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors)
    entry = load_checkpoint(prefix).entry("t3")
    _flip_byte(prefix + ".data-00000-of-00001", entry.offset + entry.size // 2)
    with pytest.raises(CRCMismatchError, match="'t3'"):
        load_checkpoint(prefix).get_tensors()
    np.testing.assert_array_equal(load_checkpoint(prefix).get_tensors(["t2"])["t2"], tensors["t2"])


def test_get_tensors_without_the_native_crc_reads_one_by_one_and_still_checks(tmp_path, small_chunks, tensors,
                                                                              monkeypatch):
    from orchestrator.checkpoint import crc

    monkeypatch.setattr(crc, "_native_extend", None)
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors)
    values = load_checkpoint(prefix).get_tensors()
    for name, expected in tensors.items():
        np.testing.assert_array_equal(values[name], expected)
    entry = load_checkpoint(prefix).entry("t5")
    _flip_byte(prefix + ".data-00000-of-00001", entry.offset + 3)
    with pytest.raises(CRCMismatchError, match="'t5'"):
        load_checkpoint(prefix).get_tensors()

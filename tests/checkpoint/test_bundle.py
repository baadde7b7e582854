"""Bundle writing and reading: every dtype, strings, 0-d/empty tensors, shards, commit rules."""

import os

import ml_dtypes
import numpy as np
import pytest

from orchestrator.checkpoint import bundle, crc, reader, writer
from orchestrator.checkpoint.errors import (
    CheckpointNotFoundError,
    CRCMismatchError,
    InvalidCheckpointWriteError,
    UnsupportedDtypeError,
)
from orchestrator.checkpoint.storage import Storage

POD_DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, np.int8, np.int16, np.int32, np.int64,
              np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.complex128]


def _sample(dtype, shape=(3, 5)):
    rng = np.random.default_rng(7)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    return rng.normal(size=shape).astype(dtype)


def _write(prefix, tensors, storage=None, shard_id=0, num_shards=1):
    storage, prefix = storage or Storage.for_path(prefix)
    w = bundle.ShardWriter(prefix, shard_id, num_shards, storage)
    for name, value in tensors.items():
        w.add(name, value)
    return w.finish()


def _bits(array):
    array = np.asarray(array)
    return array.dtype, array.shape, array.tobytes()


@pytest.mark.parametrize("dtype", POD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_pod_dtype_round_trips_bit_exact(tmp_path, dtype):
    tensors = {"full": _sample(dtype), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 4))}
    prefix = writer.write_checkpoint(str(tmp_path / "m"), tensors)
    r = reader.CheckpointReader(prefix)
    for name, value in tensors.items():
        got = r.get_tensor(name)
        assert _bits(got) == _bits(value), name
        assert got.flags.writeable
    assert r.get_variable_to_dtype_map() == {n: np.dtype(dtype) for n in tensors}
    assert r.get_variable_to_shape_map() == {"empty": [0, 4], "full": [3, 5], "scalar": []}


def test_nan_payloads_and_negative_zero_survive(tmp_path):
    raw = np.array([0x7FC00001, 0xFFC12345, 0x80000000, 0x7F800000], dtype=np.uint32)
    prefix = writer.write_checkpoint(str(tmp_path / "m"), {"f": raw.view(np.float32)})
    assert reader.CheckpointReader(prefix).get_tensor("f").view(np.uint32).tolist() == raw.tolist()


def test_data_file_holds_little_endian_bytes_in_add_order(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "m"))
    a = np.array([1.0, 2.0], np.float32)
    b = np.array([[1, 2], [3, 4]], dtype=">i4")  # big-endian input is stored little-endian
    result = _write(prefix, {"z_first": a, "a_second": b}, (storage, prefix))
    data = (tmp_path / "m.data-00000-of-00001").read_bytes()
    assert data == a.tobytes() + np.array([[1, 2], [3, 4]], "<i4").tobytes()
    assert result.nbytes == len(data) == 24
    bundle.write_index(prefix, [result], storage)
    r = reader.CheckpointReader(prefix)
    assert (r.entry("z_first").offset, r.entry("a_second").offset) == (0, 8)
    assert r.get_tensor("a_second").tolist() == [[1, 2], [3, 4]]


def test_string_layout_matches_the_reference_example():
    chunks, size, masked = bundle.encode_string_tensor(np.array([b"hello", b"", b"w\0rld"], object), "s")
    assert b"".join(chunks).hex() == "050005" "3bde4ff8" + b"hellow\0rld".hex()
    assert (size, masked) == (17, 0x17B9BFDC)
    chunks, size, masked = bundle.encode_string_tensor(np.array([], object), "empty")
    assert b"".join(chunks) == bytes.fromhex("d8ea82a2") and masked == crc.mask(crc.crc32c(bytes.fromhex("d8ea82a2")))


def test_strings_round_trip_with_nul_non_ascii_empty_and_long(tmp_path):
    tensors = {
        "s": np.array([[b"a\x00b", "héllo".encode()], [b"", b"\xff\xfe" * 200]], dtype=object),
        "scalar": np.array(b"", dtype=object),
        "none": np.array([], dtype=object),
        "text": np.array(["ünï", "code"]),  # str elements are stored as UTF-8
    }
    prefix = writer.write_checkpoint(str(tmp_path / "m"), tensors)
    r = reader.CheckpointReader(prefix)
    got = r.get_tensor("s")
    assert got.dtype == object and got.shape == (2, 2)
    assert got.tolist() == tensors["s"].tolist() and all(type(x) is bytes for x in got.reshape(-1))
    assert r.get_tensor("scalar").shape == () and r.get_tensor("scalar")[()] == b""
    assert r.get_tensor("none").shape == (0,)
    assert r.get_tensor("text").tolist() == ["ünï".encode(), b"code"]
    assert r.get_variable_to_dtype_map()["s"] == np.dtype(object)
    assert r.entry("scalar").size == 5  # one varint, 4-byte length CRC


def test_unsupported_dtypes_are_rejected_naming_the_tensor(tmp_path):
    with pytest.raises(UnsupportedDtypeError, match="'when'"):
        writer.write_checkpoint(str(tmp_path / "m"), {"when": np.array(["2020-01-01"], "datetime64[D]")})
    with pytest.raises(UnsupportedDtypeError, match="'objs'"):
        writer.write_checkpoint(str(tmp_path / "m"), {"objs": np.array([1, 2], dtype=object)})
    assert os.listdir(tmp_path) == []  # nothing left behind


@pytest.mark.parametrize("num_shards", [1, 3, 5])
def test_write_checkpoint_balances_shards_by_bytes(tmp_path, num_shards):
    sizes = [4000, 3000, 2000, 1000, 1000, 500, 10, 10]
    tensors = {f"t{i}": np.zeros(n, np.uint8) + i for i, n in enumerate(sizes)}
    prefix = writer.write_checkpoint(str(tmp_path / "m"), tensors, num_shards=num_shards)
    r = reader.CheckpointReader(prefix)
    assert r.num_shards == num_shards
    files = [os.path.getsize(p) for p in r.data_paths()]
    assert sum(files) == sum(sizes)
    expected_loads = [0] * num_shards
    for n in sorted(sizes, reverse=True):
        expected_loads[expected_loads.index(min(expected_loads))] += n
    assert sorted(files) == sorted(expected_loads)
    for name, value in tensors.items():
        assert np.array_equal(r.get_tensor(name), value)


def test_plan_is_deterministic_and_greedy():
    plan = writer.plan_shards({"a": 10, "b": 10, "c": 5, "d": 5, "e": 1}, 2)
    assert plan == [["a", "c", "e"], ["b", "d"]]
    assert writer.plan_shards({"a": 1}, 3) == [["a"], [], []]


def test_independent_shard_writers_then_merged_index(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "ckpt"))
    parts = [{"w0": np.arange(4.0)}, {"w1": np.arange(6, dtype=np.int32)}, {}]
    results = [_write(prefix, p, (storage, prefix), i, 3) for i, p in enumerate(parts)]
    assert [r.shard_id for r in results] == [0, 1, 2]
    assert not (tmp_path / "ckpt.index").exists()  # not committed until write_index
    bundle.write_index(prefix, list(reversed(results)), storage)
    r = reader.CheckpointReader(prefix)
    assert r.keys() == ["w0", "w1"] and r.entry("w1").shard_id == 1
    assert r.data_paths()[2].endswith("ckpt.data-00002-of-00003")
    r.verify()


def test_write_index_rejects_incomplete_or_inconsistent_shards(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "c"))
    r0 = _write(prefix, {"a": np.ones(2)}, (storage, prefix), 0, 2)
    r1 = _write(prefix, {"b": np.ones(2)}, (storage, prefix), 1, 2)
    with pytest.raises(InvalidCheckpointWriteError, match="exactly once"):
        bundle.write_index(prefix, [r0], storage)
    with pytest.raises(InvalidCheckpointWriteError, match="exactly once"):
        bundle.write_index(prefix, [r0, r0], storage)
    dup = bundle.ShardResult(1, 2, r1.data_path, r1.nbytes, {"a": r0.entries["a"]})
    with pytest.raises(InvalidCheckpointWriteError, match="'a' is written by more than one shard"):
        bundle.write_index(prefix, [r0, dup], storage)
    os.remove(r1.data_path)
    with pytest.raises(CheckpointNotFoundError, match=r"c\.data-00001-of-00002"):
        bundle.write_index(prefix, [r0, r1], storage)
    assert not (tmp_path / "c.index").exists()


def test_writer_rejects_duplicate_and_empty_names_and_use_after_finish(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "c"))
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    w.add("a", np.ones(1))
    with pytest.raises(InvalidCheckpointWriteError, match="'a' added twice"):
        w.add("a", np.ones(1))
    with pytest.raises(InvalidCheckpointWriteError):
        w.add("", np.ones(1))
    w.finish()
    with pytest.raises(InvalidCheckpointWriteError, match="already finished"):
        w.add("b", np.ones(1))
    with pytest.raises(InvalidCheckpointWriteError):
        bundle.ShardWriter(prefix, 2, 2, storage)


def _files(storage, root):
    return [p for p in storage.glob(root + "/**") if not storage.isdir(p)]


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_abort_and_exceptions_leave_no_files(tmp_path, memory_root, backend):
    root = str(tmp_path) if backend == "local" else memory_root
    storage, prefix = Storage.for_path(root + "/c")
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    w.add("a", np.ones(1000))
    w.abort()
    w.abort()
    with pytest.raises(RuntimeError):
        with bundle.ShardWriter(prefix, 0, 1, storage) as w2:
            w2.add("a", np.ones(10))
            raise RuntimeError("worker died mid-save")
    finished = bundle.ShardWriter(prefix, 0, 1, storage)
    finished.add("a", np.ones(3))
    result = finished.finish()
    assert storage.exists(result.data_path)
    finished.abort()
    assert _files(storage, root) == []


def test_data_file_appears_only_at_finish(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "c"))
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    w.add("a", np.ones(100))
    assert not os.path.exists(bundle.data_filename(prefix, 0, 1))
    w.finish()
    assert os.path.getsize(bundle.data_filename(prefix, 0, 1)) == 800


def test_opening_reads_only_the_index_and_get_reads_only_that_tensor(memory_root, monkeypatch):
    tensors = {f"t{i}": np.full(250_000, i, np.float32) for i in range(8)}  # 1 MB each
    prefix = writer.write_checkpoint(memory_root + "/m", tensors, num_shards=2)
    reads = []
    real_ranges, real_bytes = Storage.read_ranges, Storage.read_bytes
    monkeypatch.setattr(Storage, "read_ranges",
                        lambda s, ranges: reads.extend((p, n) for p, _, n in ranges) or real_ranges(s, ranges))
    monkeypatch.setattr(Storage, "read_bytes", lambda s, p: reads.append((p, -1)) or real_bytes(s, p))
    r = reader.CheckpointReader(prefix)
    assert [p for p, _ in reads] == [prefix + ".index"]
    reads.clear()
    assert np.array_equal(r.get_tensor("t5"), tensors["t5"])
    assert reads == [(bundle.data_filename(prefix, r.entry("t5").shard_id, 2), 1_000_000)]


def test_reader_opens_without_data_files_and_names_the_missing_shard(tmp_path):
    prefix = writer.write_checkpoint(str(tmp_path / "m"), {"a": np.ones(3), "b": np.zeros(3)}, num_shards=2)
    r0 = reader.CheckpointReader(prefix)
    missing = r0.data_paths()[r0.entry("b").shard_id]
    os.remove(missing)
    r = reader.CheckpointReader(prefix)
    assert r.get_variable_to_shape_map() == {"a": [3], "b": [3]}
    with pytest.raises(CheckpointNotFoundError, match=rf"{os.path.basename(missing)}.*'b'"):
        r.get_tensor("b")
    with pytest.raises(CheckpointNotFoundError, match=os.path.basename(missing)):
        r.verify()


def test_load_checkpoint_and_list_variables(tmp_path):
    prefix = writer.write_checkpoint(str(tmp_path / "m"), {"b/x": np.ones((2, 3)), "a": np.int64(1)})
    assert reader.list_variables(prefix) == [("a", []), ("b/x", [2, 3])]
    assert reader.load_checkpoint(prefix).has_tensor("b/x")
    assert not reader.load_checkpoint(prefix).has_tensor("nope")
    with pytest.raises(CheckpointNotFoundError, match="'nope'"):
        reader.load_checkpoint(prefix).get_tensor("nope")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        reader.load_checkpoint(str(tmp_path / "other"))


def test_file_url_and_relative_paths_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert writer.write_checkpoint("rel/m", {"a": np.ones(2)}) == "rel/m"
    assert reader.load_checkpoint(f"file://{tmp_path}/rel/m").get_tensor("a").tolist() == [1.0, 1.0]


def test_5000_tensor_index_spans_several_blocks(tmp_path):
    names = [f"model/layer_{i:05d}/kernel/.ATTRIBUTES/VARIABLE_VALUE" for i in range(5200)]
    prefix = writer.write_checkpoint(str(tmp_path / "m"), {n: np.float32(i) for i, n in enumerate(names)})
    assert os.path.getsize(prefix + ".index") > 256 * 1024
    r = reader.CheckpointReader(prefix)
    assert r.keys() == sorted(names)
    assert r.get_tensor(names[4321]) == np.float32(4321)


def test_big_tensors_use_the_chunked_path_and_still_detect_corruption(tmp_path):
    big = np.random.default_rng(0).random(5_000_001).astype(np.float32)  # 20 MB: above 2 chunks, odd length
    prefix = writer.write_checkpoint(str(tmp_path / "m"), {"big": big, "small": big[:3].copy()})
    r = reader.CheckpointReader(prefix)
    assert r.get_tensor("big").tobytes() == big.tobytes()
    with open(bundle.data_filename(prefix, 0, 1), "r+b") as f:
        f.seek(r.entry("big").offset + 17_000_001)  # inside the third chunk
        f.write(b"\xff")
    with pytest.raises(CRCMismatchError, match="'big'"):
        r.get_tensor("big")
    assert r.get_tensor("small").tobytes() == big[:3].tobytes()


@pytest.fixture
def file_size_limit():
    """A real write fault: the kernel refuses to grow any file past 1 MB (EFBIG)."""
    import resource
    import signal

    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("nbytes", [3_000_000, 40_000_000])  # direct and chunked write paths
def test_failed_write_poisons_the_writer_and_abort_cleans_up(tmp_path, file_size_limit, nbytes):
    storage, prefix = Storage.for_path(str(tmp_path / "c"))
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    w.add("small", np.ones(10))
    with pytest.raises(OSError):
        w.add("big", np.zeros(nbytes, np.uint8))
    with pytest.raises(InvalidCheckpointWriteError, match="failed"):
        w.add("more", np.ones(1))
    with pytest.raises(InvalidCheckpointWriteError, match="failed"):
        w.finish()
    w.abort()
    assert os.listdir(tmp_path) == []


def test_write_checkpoint_accepts_variables(tmp_path):
    from orchestrator.checkpoint.variables import Variable

    v = Variable("dense/kernel", np.arange(6, dtype=np.float32).reshape(2, 3))
    prefix = writer.write_checkpoint(str(tmp_path / "m"), {v.name: v, "step": np.int64(3)})
    assert reader.CheckpointReader(prefix).get_tensor("dense/kernel").tolist() == v.numpy().tolist()


def test_big_tensor_round_trip_on_s3(s3_bucket, s3_options):
    big = np.random.default_rng(1).integers(0, 2**31, 4_300_001, dtype=np.int32)  # 17 MB: chunked write, multipart
    prefix = writer.write_checkpoint(f"{s3_bucket}/ckpt/m", {"big": big, "s": np.array([b"x"], object)},
                                     num_shards=2, storage_options=s3_options)
    r = reader.load_checkpoint(prefix, storage_options=s3_options)
    assert r.get_tensor("big").tobytes() == big.tobytes()
    r.verify()


def test_a_fresh_process_reads_bfloat16_without_importing_ml_dtypes_first(tmp_path):
    """ml_dtypes is imported on the first bfloat16 tensor (checkpoint/dtypes.bfloat16), in a
    process that never imported it itself: values and dtype come back as written."""
    import subprocess
    import sys

    writer.write_checkpoint(str(tmp_path / "model.ckpt-1"),
                            {"b": np.array([1.5, -2.0, 3.0], ml_dtypes.bfloat16), "f": np.ones(2, np.float32)})
    code = ("import sys; from orchestrator.checkpoint import load_checkpoint; "
            "before = 'ml_dtypes' in sys.modules; r = load_checkpoint(sys.argv[1]); t = r.get_tensor('b'); "
            "print(before, t.dtype, t.astype('float32').tolist())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.ckpt-1")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "bfloat16", "[1.5,", "-2.0,", "3.0]"]

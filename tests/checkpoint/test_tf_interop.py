"""Interop with real TensorFlow, both ways, bit-exact.

TF reads what we write (every dtype, strings, 0-d/empty, many shards, multi-block
index, sliced tensors); we read what TF writes (TF1 Saver sharded + partitioned,
TF2 Keras + optimizer, MaxShardSizePolicy shards); the ``checkpoint`` state file
both ways; and our ``.index`` bytes equal TF's for the same tensors.
"""

from __future__ import annotations

import os
import struct
import sys
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
ml_dtypes = pytest.importorskip("ml_dtypes")

from orchestrator.checkpoint import bundle  # noqa: E402
from orchestrator.checkpoint.reader import list_variables, load_checkpoint  # noqa: E402
from orchestrator.checkpoint.state import (  # noqa: E402
    get_checkpoint_state,
    latest_checkpoint,
    update_checkpoint_state,
)
from orchestrator.checkpoint.storage import Storage  # noqa: E402
from orchestrator.checkpoint.writer import write_checkpoint  # noqa: E402
from tests.checkpoint import tf_fixtures  # noqa: E402
from tests.checkpoint.tf_fixtures import canonical  # noqa: E402

pytestmark = pytest.mark.tf

BLOCK_SIZE = 256 * 1024
BIG_INDEX_TENSORS = 5200


# ---------------------------------------------------------------------------- tensors
def _bits(dtype, uint_dtype, patterns) -> np.ndarray:
    """An array of ``dtype`` with exactly these bit patterns (NaN payloads included)."""
    return np.array(patterns, dtype=uint_dtype).view(dtype)


def _float_tensors() -> dict[str, np.ndarray]:
    return {
        "f16": _bits(np.float16, np.uint16, [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E01, 0xFD55, 0x3C00, 0x0001]),
        "f32": _bits(np.float32, np.uint32, [0, 0x80000000, 0x7F800000, 0x7FC00001, 0x7F800001, 0xFFBADBAD,
                                             0x3F800000, 0x00000001]).reshape(2, 4),
        "f64": _bits(np.float64, np.uint64, [0x7FF8000000000001, 0xFFF0000000000BAD, 0x3FF0000000000000,
                                             1, 0x8000000000000000, 0x7FF0000000000000]).reshape(3, 1, 2),
        "bf16": _bits(ml_dtypes.bfloat16, np.uint16, [0x3F80, 0x7FC1, 0xFFFF, 0x7F80, 0x8000, 0x0001]),
        "c64": np.array([1 + 2j, complex(np.nan, -0.0), complex(np.inf, 3e-45)], np.complex64),
        "c128": np.array([[1e300 - 1e-300j, complex(-np.inf, np.nan)]], np.complex128),
    }


def _int_tensors() -> dict[str, np.ndarray]:
    out = {}
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        info = np.iinfo(dtype)
        name = np.dtype(dtype).name
        out[name] = np.array([info.min, info.max, 0, 1, info.max // 3], dtype)
    out["bool"] = np.array([[True, False, True], [False, False, True]])
    return out


def _string_tensors() -> dict[str, np.ndarray]:
    strings = [b"a\x00b", "é日本".encode(), b"", b"\x00", b"trailing\x00", b"\xff" * 3, b"x" * 300]
    return {
        "str/vector": np.array(strings, dtype=object),
        "str/matrix": np.array([[b"", b"\x00\x00"], ["ü".encode(), b"\n"]], dtype=object),
        "str/scalar_nul": np.array(b"n\x00l", dtype=object),
        "str/scalar_empty": np.array(b"", dtype=object),
        "str/empty": np.zeros((0,), dtype=object),
    }


def _shape_edge_tensors() -> dict[str, np.ndarray]:
    return {
        "scalar/f32": np.array(3.5, np.float32),
        "scalar/i64": np.array(-7, np.int64),
        "scalar/bool": np.array(True),
        "scalar/bf16": np.array(-1.5, ml_dtypes.bfloat16),
        "empty/f32": np.zeros((0,), np.float32),
        "empty/i32_3d": np.zeros((3, 0, 2), np.int32),
        "empty/c128": np.zeros((0, 4), np.complex128),
        "rank4/f64": np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5) / 7,
    }


def all_dtype_tensors() -> dict[str, np.ndarray]:
    """Every dtype of the issue, with edge bit patterns, strings and odd shapes."""
    return {**_float_tensors(), **_int_tensors(), **_string_tensors(), **_shape_edge_tensors()}


def big_index_tensors(count: int = BIG_INDEX_TENSORS) -> dict[str, np.ndarray]:
    """Many tiny tensors with long names: an index of several 256 KiB blocks."""
    rng = np.random.default_rng(7)
    dtypes = (np.float32, np.int64, np.float16, np.uint8)
    tensors = {}
    for i in range(count):
        name = f"model/block_{i // 100:03d}/layer_{i:05d}/" + "very_long_parameter_name_segment/" * 3 + "kernel"
        dtype = dtypes[i % len(dtypes)]
        tensors[name] = (rng.standard_normal(i % 4 + 1) * 100).astype(dtype)
    return tensors


# ---------------------------------------------------------------------------- helpers
def _decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def count_data_blocks(index_bytes: bytes) -> int:
    """Data blocks of a TF table: entries in its index block (restart interval 1)."""
    footer = index_bytes[-48:]
    _, pos = _decode_varint(footer, 0)
    _, pos = _decode_varint(footer, pos)
    offset, pos = _decode_varint(footer, pos)
    size, _ = _decode_varint(footer, pos)
    block = index_bytes[offset:offset + size]
    (num_restarts,) = struct.unpack("<I", block[-4:])
    return num_restarts


def assert_tf_reads(prefix: str, tensors: dict[str, np.ndarray]) -> None:
    """``tf.train.load_checkpoint`` sees exactly these tensors, bit for bit."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    assert {k: tuple(v) for k, v in shapes.items()} == {k: v.shape for k, v in tensors.items()}
    dtypes = reader.get_variable_to_dtype_map()
    for name, expected in tensors.items():
        assert tf_fixtures.tf_numpy_dtype(dtypes[name]) == expected.dtype, name
        assert canonical(reader.get_tensor(name)) == canonical(expected), name


def assert_we_read_like_tf(prefix: str) -> int:
    """Our reader returns, for every key, exactly what TF's reader returns; returns the key count."""
    theirs = tf.train.load_checkpoint(prefix)
    ours = load_checkpoint(prefix)
    tf_shapes = {k: tuple(v) for k, v in theirs.get_variable_to_shape_map().items()}
    assert {k: tuple(v) for k, v in ours.get_variable_to_shape_map().items()} == tf_shapes
    our_dtypes = ours.get_variable_to_dtype_map()
    for name, tf_dtype in theirs.get_variable_to_dtype_map().items():
        assert np.dtype(our_dtypes[name]) == tf_fixtures.tf_numpy_dtype(tf_dtype), name  # strings: object
        assert ours.has_tensor(name)
        assert canonical(ours.get_tensor(name)) == canonical(theirs.get_tensor(name)), name
    assert sorted((n, tuple(s)) for n, s in list_variables(prefix)) == sorted(
        (n, tuple(s)) for n, s in tf.train.list_variables(prefix))
    ours.verify()
    return len(tf_shapes)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def data_files(prefix: str) -> list[str]:
    directory, base = os.path.split(prefix)
    return sorted(f for f in os.listdir(directory) if f.startswith(base + ".data-"))


# ---------------------------------------------------------------------------- TF reads ours
@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_tf_reads_every_dtype_bit_exact(tmp_path, num_shards):
    tensors = all_dtype_tensors()
    prefix = write_checkpoint(str(tmp_path / "all"), tensors, num_shards=num_shards)
    assert data_files(prefix) == [f"all.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    if num_shards > 1:
        sizes = [os.path.getsize(tmp_path / f) for f in data_files(prefix)]
        assert sum(1 for s in sizes if s > 0) >= 2, f"bytes not spread over shards: {sizes}"
    assert_tf_reads(prefix, tensors)


@pytest.fixture(scope="module")
def big_index(tmp_path_factory):
    """Our checkpoint and TF's SaveV2 of the same 5,200 tensors, same add order."""
    root = tmp_path_factory.mktemp("big_index")
    tensors = big_index_tensors()
    names = sorted(tensors)
    tf_prefix = tf_fixtures.write_save_v2(str(root / "tf" / "big"), tensors, order=names)
    storage, our_prefix = Storage.for_path(str(root / "ours" / "big"))
    writer = bundle.ShardWriter(our_prefix, 0, 1, storage)
    for name in names:
        writer.add(name, tensors[name])
    bundle.write_index(our_prefix, [writer.finish()], storage)
    return tensors, our_prefix, tf_prefix


def test_tf_reads_index_of_several_blocks(big_index):
    tensors, prefix, _ = big_index
    index = read_file(prefix + ".index")
    assert len(index) > 2 * BLOCK_SIZE
    assert count_data_blocks(index) >= 3
    assert_tf_reads(prefix, tensors)


def test_multi_block_index_bytes_equal_tf(big_index):
    _, ours, theirs = big_index
    assert read_file(ours + ".index") == read_file(theirs + ".index")
    data = ".data-00000-of-00001"
    assert read_file(ours + data) == read_file(theirs + data)


REFERENCE_INDEX_HEX = (  # reference 3.5, produced by TF 2.21
    "000006" "08011a020801"  # header entry: "" -> num_shards 1, version {producer 1}
    "00010f" "78" "0801120412020802280835593ce535"  # "x" -> float32 [2], size 8, crc
    "00000000" "01000000" "0091364233"  # restarts [0], count 1; trailer
    "0000000001000000" "00c0f2a1b0"  # empty metaindex block + trailer
    "000102" "79" "0024" "00000000" "01000000" "0008121017"  # index: "y" -> (0, 36); trailer
    "2908360e" + "00" * 36 + "57fb808b247547db"  # footer: handles, padding, magic
)


def test_reference_example_index_bytes_equal_tf(tmp_path):
    """Reference 3.5: SaveV2 of float32 [1, 2] under "x"."""
    x = {"x": np.array([1.0, 2.0], np.float32)}
    ours = write_checkpoint(str(tmp_path / "ours" / "x"), x)
    theirs = tf_fixtures.write_save_v2(str(tmp_path / "tf" / "x"), x)
    our_index = read_file(ours + ".index")
    assert our_index == read_file(theirs + ".index")
    assert our_index.hex() == REFERENCE_INDEX_HEX
    assert read_file(ours + ".data-00000-of-00001") == bytes.fromhex("0000803f00000040")


SLICED = [
    # name, dtype, full shape, [(shard, starts, lengths)]
    ("p/f32", np.float32, (10, 4), [(0, (0, 0), (4, 4)), (1, (4, 0), (3, 4)), (2, (7, 0), (3, 4))]),
    ("p/i64", np.int64, (6, 6), [(2, (0, 0), (6, 3)), (0, (0, 3), (6, 3))]),
    ("p/bool", np.bool_, (5,), [(1, (0,), (2,)), (2, (2,), (3,))]),
    ("p/c64", np.complex64, (4, 2), [(0, (0, 0), (1, 2)), (1, (1, 0), (3, 2))]),
    ("p/bf16", ml_dtypes.bfloat16, (3, 3), [(2, (0, 0), (3, 1)), (1, (0, 1), (3, 2))]),
    ("p/u8_whole", np.uint8, (2, 2), [(0, (0, 0), (2, 2))]),
    ("p/f64_3d", np.float64, (2, 3, 4), [(0, (0, 0, 0), (2, 3, 1)), (1, (0, 0, 1), (2, 3, 3))]),
]


def _full_value(dtype, shape) -> np.ndarray:
    count = int(np.prod(shape))
    if dtype is np.bool_:
        return (np.arange(count) % 3 == 0).reshape(shape)
    values = np.arange(count, dtype=np.float64) * 1.25 - 3
    if np.dtype(dtype).kind == "c":
        values = values + 1j * values[::-1]
    return values.astype(dtype).reshape(shape)


def write_sliced_checkpoint(prefix: str, num_shards: int = 3) -> dict[str, np.ndarray]:
    """Partitioned tensors whose slices live in different shards; returns the full values."""
    storage, prefix = Storage.for_path(prefix)
    writers = [bundle.ShardWriter(prefix, i, num_shards, storage) for i in range(num_shards)]
    full = {}
    for name, dtype, shape, parts in SLICED:
        full[name] = _full_value(dtype, shape)
        for shard, starts, lengths in parts:
            region = tuple(slice(s, s + n) for s, n in zip(starts, lengths))
            writers[shard].add_slice(name, shape, starts, lengths, np.ascontiguousarray(full[name][region]))
    writers[0].add("plain", np.arange(3, dtype=np.int32))
    full["plain"] = np.arange(3, dtype=np.int32)
    bundle.write_index(prefix, [w.finish() for w in writers], storage)
    return full


def test_tf_reassembles_our_sliced_tensors(tmp_path):
    full = write_sliced_checkpoint(str(tmp_path / "sliced"))
    assert_tf_reads(str(tmp_path / "sliced"), full)
    ours = load_checkpoint(str(tmp_path / "sliced"))
    for name, value in full.items():
        assert canonical(ours.get_tensor(name)) == canonical(value), name


# ---------------------------------------------------------------------------- we read TF's
@pytest.fixture(scope="module")
def tf_written(tmp_path_factory):
    """Every kind of TF-written checkpoint, written once for the module."""
    root = tmp_path_factory.mktemp("tf_written")
    return {
        "tf1_sharded": tf_fixtures.write_tf1_saver(str(root / "tf1_sharded"), sharded=True),
        "tf1_plain": tf_fixtures.write_tf1_saver(str(root / "tf1_plain"), sharded=False, num_partitions=4),
        "keras": tf_fixtures.write_keras_checkpoint(str(root / "keras")),
        "keras_legacy": tf_fixtures.write_keras_checkpoint(str(root / "keras_legacy"), legacy_optimizer=True),
        "max_shard": tf_fixtures.write_max_shard_checkpoint(str(root / "max_shard"), max_shard_size=1024),
    }


def test_we_read_tf1_sharded_saver_with_partitions(tf_written):
    prefix = tf_written["tf1_sharded"]
    assert len(data_files(prefix)) == tf_fixtures.TF1_DEVICES
    ours = load_checkpoint(prefix)
    assert ours.get_tensor("embedding").shape == (10, 4)
    assert ours.get_tensor("embedding/RMSProp_1").shape == (10, 4)
    assert list(ours.get_tensor("names")) == [b"a\x00b", b"\xff\xfe", b""]
    assert int(ours.get_tensor("global_step")) == 1
    assert assert_we_read_like_tf(prefix) == 10


def test_we_read_tf1_plain_saver_with_partitions(tf_written):
    prefix = tf_written["tf1_plain"]
    assert data_files(prefix) == [os.path.basename(prefix) + ".data-00000-of-00001"]
    assert assert_we_read_like_tf(prefix) == 10


@pytest.mark.parametrize("kind", ["keras", "keras_legacy"])
def test_we_read_tf2_keras_model_and_optimizer(tf_written, kind):
    prefix = tf_written[kind]
    ours = load_checkpoint(prefix)
    names = ours.get_variable_to_shape_map()
    assert "model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE" in names
    assert ours.get_variable_to_dtype_map()["bf16/.ATTRIBUTES/VARIABLE_VALUE"] == ml_dtypes.bfloat16
    assert ours.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH").shape == ()
    assert assert_we_read_like_tf(prefix) > 15


def test_we_read_tf2_max_shard_size_split(tf_written):
    prefix = tf_written["max_shard"]
    assert len(data_files(prefix)) >= 3
    big = "big/.ATTRIBUTES/VARIABLE_VALUE"
    assert len(load_checkpoint(prefix).entry(big).slices) >= 2  # TF sliced it across shards
    np.testing.assert_array_equal(load_checkpoint(prefix).get_tensor(big),
                                  np.arange(1000, dtype=np.float32).reshape(50, 20) / 3)
    assert assert_we_read_like_tf(prefix) > 15


# ---------------------------------------------------------------------------- state file
def _write_steps(directory, steps) -> list[str]:
    return [write_checkpoint(os.path.join(directory, f"ckpt-{s}"), {"step": np.array(s, np.int64)})
            for s in steps]


def test_tf_reads_our_state_file(tmp_path):
    directory = str(tmp_path)
    _write_steps(directory, [1, 2, 3])
    stamps = [1795369331.903781, 1795369331.9125507, 1795369340.5]
    update_checkpoint_state(directory, "ckpt-3", ["ckpt-1", "ckpt-2", "ckpt-3"],
                            all_model_checkpoint_timestamps=stamps, last_preserved_timestamp=1795369330.834732)
    state = tf.train.get_checkpoint_state(directory)
    assert state.model_checkpoint_path == os.path.join(directory, "ckpt-3")
    assert list(state.all_model_checkpoint_paths) == [os.path.join(directory, f"ckpt-{s}") for s in (1, 2, 3)]
    assert list(state.all_model_checkpoint_timestamps) == stamps
    assert state.last_preserved_timestamp == 1795369330.834732
    assert 'model_checkpoint_path: "ckpt-3"' in (tmp_path / "checkpoint").read_text()
    assert tf.train.latest_checkpoint(directory) == os.path.join(directory, "ckpt-3")
    assert int(tf.train.load_checkpoint(directory).get_tensor("step")) == 3


def test_tf_manager_adopts_our_checkpoints(tmp_path):
    """TF's manager only tracks entries stamped after last_preserved_timestamp."""
    directory = str(tmp_path)
    _write_steps(directory, [1, 2])
    now = time.time()
    update_checkpoint_state(directory, "ckpt-2", ["ckpt-1", "ckpt-2"],
                            all_model_checkpoint_timestamps=[now - 20, now - 10], last_preserved_timestamp=now - 30)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(), directory, max_to_keep=5)
    assert manager.latest_checkpoint == os.path.join(directory, "ckpt-2")
    assert manager.checkpoints == [os.path.join(directory, "ckpt-1"), os.path.join(directory, "ckpt-2")]


def test_tf_reads_our_absolute_paths(tmp_path):
    directory = str(tmp_path)
    prefixes = _write_steps(directory, [5])
    update_checkpoint_state(directory, prefixes[0], [prefixes[0]], save_relative_paths=False)
    assert f'model_checkpoint_path: "{prefixes[0]}"' in (tmp_path / "checkpoint").read_text()
    assert tf.train.latest_checkpoint(directory) == prefixes[0]


def _assert_state_like_tf(directory: str) -> object:
    theirs = tf.train.get_checkpoint_state(directory)
    ours = get_checkpoint_state(directory)
    assert ours.model_checkpoint_path == theirs.model_checkpoint_path
    assert list(ours.all_model_checkpoint_paths) == list(theirs.all_model_checkpoint_paths)
    assert list(ours.all_model_checkpoint_timestamps) == list(theirs.all_model_checkpoint_timestamps)
    assert ours.last_preserved_timestamp == theirs.last_preserved_timestamp
    assert latest_checkpoint(directory) == tf.train.latest_checkpoint(directory)
    return ours


def test_we_read_checkpoint_manager_state(tmp_path):
    directory = str(tmp_path / "mgr")
    prefixes = tf_fixtures.write_manager_checkpoints(directory, saves=3, max_to_keep=2)
    ours = _assert_state_like_tf(directory)
    assert ours.all_model_checkpoint_paths == prefixes[1:]
    assert len(ours.all_model_checkpoint_timestamps) == 2
    assert 0 < ours.last_preserved_timestamp < ours.all_model_checkpoint_timestamps[0]
    assert 'model_checkpoint_path: "ckpt-3"' in read_file(os.path.join(directory, "checkpoint")).decode()
    value = load_checkpoint(directory).get_tensor("v/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(value, np.arange(4, dtype=np.float32) + 3)


def test_we_read_tf1_saver_absolute_state(tf_written):
    directory = os.path.dirname(tf_written["tf1_sharded"])
    ours = _assert_state_like_tf(directory)
    assert ours.model_checkpoint_path == tf_written["tf1_sharded"]
    assert os.path.isabs(ours.model_checkpoint_path)
    assert list(ours.all_model_checkpoint_timestamps) == []
    assert load_checkpoint(directory).has_tensor("embedding")


def test_we_read_checkpoint_save_state(tf_written):
    directory = os.path.dirname(tf_written["keras"])
    ours = _assert_state_like_tf(directory)
    assert ours.model_checkpoint_path == tf_written["keras"]
    assert list(ours.all_model_checkpoint_paths) == [tf_written["keras"]]
    assert load_checkpoint(directory).has_tensor("save_counter/.ATTRIBUTES/VARIABLE_VALUE")


# ---------------------------------------------------------------------------- benchmark script
def _load_bench_script(monkeypatch):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_checkpoint.py")
    spec = importlib.util.spec_from_file_location("bench_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_script_reports_every_ratio_and_cleans_up(tmp_path, capsys, monkeypatch):
    bench = _load_bench_script(monkeypatch)
    assert bench.main(["--size-mb", "4", "--tensors", "4", "--repeats", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():  # the throughput table comes first, the CPU table after it
        if line.split() and line.split()[0] in bench.PHASES:
            rows.setdefault(line.split()[0], line.split())
    assert set(rows) == set(bench.PHASES)
    for phase, cells in rows.items():
        ratios = [float(c[:-1]) for c in cells if c.endswith("x") and c[:-1].replace(".", "").isdigit()]
        assert len(ratios) >= 2 and min(ratios[:2]) > 0, (phase, cells)  # ours/raw, ours/tf first
    assert "fsync" in out and "posix_fadvise" in out
    ceiling = next(line for line in out.splitlines() if line.startswith("raw+crc, warm:"))
    assert float(ceiling.split("=")[1].split("x")[0]) > 0  # the verified-read ceiling, as a ratio to raw
    assert os.listdir(tmp_path) == []


def test_tf_v1_format_is_named_with_a_conversion_command_that_works(tmp_path):
    """A V1 checkpoint (prefix or directory) gets "V1 format; convert with ..."; the command converts it."""
    import shlex
    import subprocess

    from orchestrator.checkpoint.errors import CheckpointNotFoundError
    from orchestrator.cli import main

    prefix = tf_fixtures.write_tf1_v1_saver(str(tmp_path / "old"))
    for path in (prefix, str(tmp_path / "old")):
        with pytest.raises(CheckpointNotFoundError, match="TensorFlow V1-format checkpoint") as caught:
            load_checkpoint(path)
        assert "no checkpoint found" not in str(caught.value)
    assert main(["inspect", prefix]) == 2  # bad input, one line naming the format
    command = str(caught.value).split("Convert it with TensorFlow: ", 1)[1]
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    converted = shlex.split(command)[-1]
    assert converted == str(tmp_path / "old" / "v2" / "model.ckpt-5")
    with load_checkpoint(converted) as reader:
        np.testing.assert_array_equal(reader.get_tensor("dense/kernel"), np.arange(6, dtype=np.float32).reshape(2, 3))
        assert list(reader.get_tensor("names")) == [b"a", b""]


def _narrow_tensors() -> dict[str, np.ndarray]:
    """TF's 1-byte float8 types and its int4/uint4 (one element per byte on disk), edge bits included."""
    out = {name: _bits(getattr(ml_dtypes, name), np.uint8, [0x00, 0x80, 0x7F, 0xFF, 0x01, 0x3C])
           for name in ("float8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2fnuz")}
    out["int4"] = np.array([-8, -2, 0, 1, 7], ml_dtypes.int4)
    out["uint4"] = np.array([[0, 1], [9, 15]], ml_dtypes.uint4)
    return out


def test_we_read_tf_float8_and_int4_and_restore_a_subset_beside_them(tmp_path):
    # tf.constant(np.array(..., ml_dtypes.float8_e5m2)) and tf.Variable of it save like any tensor
    tensors = {**_narrow_tensors(), "w": np.arange(3, dtype=np.float32)}
    prefix = tf_fixtures.write_save_v2(str(tmp_path / "narrow"), tensors)
    assert assert_we_read_like_tf(prefix) == len(tensors)
    from orchestrator.checkpoint.saver import Saver
    from orchestrator.checkpoint.variables import Variable

    w, e4 = Variable("w", np.zeros(3, np.float32)), Variable("e4", np.zeros(6, ml_dtypes.float8_e4m3fn))
    Saver({"w": w, "float8_e4m3fn": e4}).restore(prefix)
    assert w.numpy().tolist() == [0, 1, 2]
    assert e4.numpy().tobytes() == tensors["float8_e4m3fn"].tobytes()


def test_tf_reads_our_float8_and_int4(tmp_path):
    tensors = _narrow_tensors()
    assert_tf_reads(write_checkpoint(str(tmp_path / "narrow"), tensors, num_shards=2), tensors)

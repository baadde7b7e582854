"""What `orchestrator inspect` shows: rows, table, JSON and tensor printouts."""

import json

import numpy as np

from orchestrator.checkpoint import bundle, inspect, state, writer
from orchestrator.checkpoint.storage import Storage


def _checkpoint(tmp_path):
    prefix = writer.write_checkpoint(str(tmp_path / "m-1"), {
        "dense/kernel": np.ones((3, 4), np.float32),
        "global_step": np.int64(12),
        "names": np.array([b"ab", b"c"], object),
    }, num_shards=2)
    state.update_checkpoint_state(str(tmp_path), prefix)
    return prefix


def test_describe_lists_name_dtype_shape_size_and_shard(tmp_path):
    _checkpoint(tmp_path)
    rows = inspect.describe(str(tmp_path))  # a directory: its latest checkpoint
    assert [(r.name, r.dtype, r.shape, r.nbytes) for r in rows] == [
        ("dense/kernel", "float32", (3, 4), 48),
        ("global_step", "int64", (), 8),
        ("names", "string", (2,), 2 + 4 + 3),
    ]
    assert rows[0].shards == (0,) and {r.shard for r in rows[1:]} == {"1"}


def test_table_and_json(tmp_path):
    rows = inspect.describe(_checkpoint(tmp_path))
    text = inspect.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "dtype", "shape", "size", "shard"]
    assert lines[1].split() == ["dense/kernel", "float32", "[3,", "4]", "48", "B", "0"]
    assert lines[-1] == "3 tensors, 65 B (65 bytes)"
    doc = json.loads(inspect.to_json(rows))
    assert doc["num_tensors"] == 3 and doc["total_bytes"] == 65
    assert doc["tensors"][0] == {"name": "dense/kernel", "dtype": "float32", "shape": [3, 4], "nbytes": 48,
                                 "shards": [0], "partitioned": False}


def test_partitioned_tensor_row_lists_every_shard(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "p"))
    writers = [bundle.ShardWriter(prefix, i, 2, storage) for i in range(2)]
    writers[0].add_slice("p", (4, 2), (0, 0), (2, 2), np.zeros((2, 2), np.float64))
    writers[1].add_slice("p", (4, 2), (2, 0), (2, 2), np.ones((2, 2), np.float64))
    bundle.write_index(prefix, [w.finish() for w in writers], storage)
    (row,) = inspect.describe(prefix)
    assert (row.shape, row.nbytes, row.shards, row.partitioned, row.shard) == ((4, 2), 64, (0, 1), True, "0,1")


def test_format_tensor_summarizes_unless_full():
    big = np.arange(5000, dtype=np.int32)
    short = inspect.format_tensor("v", big)
    assert short.startswith("v (int32, [5000]):\n") and "..." in short
    full = inspect.format_tensor("v", big, full=True)
    assert "..." not in full and "4999" in full
    assert "b'a\\x00b'" in inspect.format_tensor("s", np.array([b"a\x00b"], object))

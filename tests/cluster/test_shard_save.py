"""One worker's shard write, without Ray: snapshot semantics, background write, failures."""

from __future__ import annotations

import os

import numpy as np
import pytest

from orchestrator.checkpoint import bundle
from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.checkpoint.storage import Storage
from orchestrator.cluster.shard_save import ShardSaveFailed, ShardSaver


def commit(prefix: str, result) -> CheckpointReader:
    storage, prefix = Storage.for_path(prefix)
    bundle.write_index(prefix, [result], storage)
    return CheckpointReader(prefix)


def test_async_write_holds_the_values_at_snapshot_time(tmp_path):
    saver = ShardSaver(rank=0, storage_options=None, fsync=False)
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    prefix = str(tmp_path / "model.ckpt-1")
    saver.start(1, prefix, 1, {"w": weights}, {"global_step": np.array(1, np.int64)}, asynchronous=True)
    saver.wait_snapshot()  # what the worker does before its next update
    weights += 100.0  # training goes on and updates in place while the shard is written
    result = saver.wait(1, timeout=60)
    reader = commit(prefix, result)
    np.testing.assert_array_equal(reader.get_tensor("w"), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert int(reader.get_tensor("global_step")) == 1


def test_snapshot_outlives_its_write_and_one_save_at_a_time(tmp_path):
    """The snapshot handed to ``on_snapshot`` is the memory checkpoint: the next save never reuses it."""
    saver = ShardSaver(rank=0, storage_options=None, fsync=False)
    weights = np.ones((256, 256), np.float32)
    kept = []
    saver.start(1, str(tmp_path / "a-1"), 1, {"w": weights}, {}, asynchronous=True, on_snapshot=kept.append)
    saver.wait_snapshot()
    first = saver._pending
    weights *= 2  # an in-place update after the snapshot
    saver.start(2, str(tmp_path / "a-2"), 1, {"w": weights}, {}, asynchronous=True, on_snapshot=kept.append)
    assert first.done.is_set(), "the second save started only after the first write ended"
    assert saver.wait(2, timeout=60).nbytes > 0
    assert [float(k["w"][0, 0]) for k in kept] == [1.0, 2.0]
    assert kept[0]["w"] is not kept[1]["w"]


def test_failed_write_fails_that_save_with_the_cause(tmp_path):
    saver = ShardSaver(rank=3, storage_options=None, fsync=False)
    prefix = str(tmp_path / "model.ckpt-5")
    os.makedirs(bundle.data_filename(prefix, 3, 4) + "/occupied")
    saver.start(5, prefix, 4, {"w": np.zeros(4, np.float32)}, {}, asynchronous=True)
    with pytest.raises(ShardSaveFailed, match="shard 3 of the save at step 5 failed") as info:
        saver.wait(5, timeout=60)
    assert "data-00003-of-00004" in info.value.cause
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == [], "the partial file was removed"


def test_abandon_removes_a_written_shard(tmp_path):
    saver = ShardSaver(rank=0, storage_options=None, fsync=False)
    prefix = str(tmp_path / "model.ckpt-2")
    saver.start(2, prefix, 2, {"w": np.zeros(8, np.float32)}, {}, asynchronous=False)
    path = bundle.data_filename(prefix, 0, 2)
    assert os.path.exists(path)
    saver.abandon(2)
    assert not os.path.exists(path)
    with pytest.raises(ShardSaveFailed, match="abandoned"):
        saver.wait(2, timeout=1)

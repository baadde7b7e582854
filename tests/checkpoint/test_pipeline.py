"""One save pipeline: every entry point writes the same bytes and fails with the same error."""

from __future__ import annotations

import os

import numpy as np
import pytest

from orchestrator.checkpoint import bundle, commit, pipeline
from orchestrator.checkpoint.errors import SaveFailedError
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.saver import Saver
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.variables import Variable
from orchestrator.checkpoint.writer import write_checkpoint
from orchestrator.cluster.shard_save import ShardSaver


def _variables() -> list[Variable]:
    rng = np.random.default_rng(3)
    return [Variable("dense/kernel", rng.standard_normal((16, 8)).astype(np.float32)),
            Variable("dense/bias", rng.standard_normal(8).astype(np.float32)),
            Variable("global_step", np.array(7, np.int64)),
            Variable("zeta", np.arange(40, dtype=np.float64))]


def _files(prefix: str) -> dict[str, bytes]:
    directory, name = os.path.split(prefix)
    return {f[len(name):]: open(os.path.join(directory, f), "rb").read()
            for f in sorted(os.listdir(directory)) if f.startswith(name + ".")}


@pytest.mark.parametrize("num_shards", [1, 3])
def test_every_entry_point_writes_the_same_bytes(tmp_path, num_shards):
    variables = _variables()
    tensors = {v.name: v.numpy() for v in variables}
    a = write_checkpoint(str(tmp_path / "a" / "model.ckpt-7"), tensors, num_shards=num_shards)
    b = Saver(variables, num_shards=num_shards).save(str(tmp_path / "b" / "model.ckpt"), global_step=7)
    c = CheckpointManager(str(tmp_path / "c")).save(tensors, 7, num_shards=num_shards)
    assert _files(a) == _files(b) == _files(c)
    assert len(_files(a)) == num_shards + 1


def test_a_worker_shard_is_written_as_the_pipeline_writes_it(tmp_path):
    """The runtime's per-worker write (ShardSaver) + commit == write_checkpoint with one shard."""
    tensors = {v.name: v.numpy() for v in _variables()}
    expected = write_checkpoint(str(tmp_path / "a" / "model.ckpt-7"), tensors)
    saver = ShardSaver(rank=0, storage_options=None, fsync=True)
    prefix = str(tmp_path / "b" / "model.ckpt-7")
    saver.start(7, prefix, 1, {}, tensors, asynchronous=True)
    storage, prefix = Storage.for_path(prefix)
    commit.commit_index(prefix, [saver.wait(7, timeout=60)], storage)
    assert _files(prefix) == _files(expected)


def test_a_worker_shard_failure_is_a_save_failed_error(tmp_path):
    saver = ShardSaver(rank=1, storage_options=None, fsync=False)
    prefix = str(tmp_path / "model.ckpt-5")
    os.makedirs(bundle.data_filename(prefix, 1, 2) + "/occupied")  # the final name is taken by a directory
    saver.start(5, prefix, 2, {}, {"w": np.zeros(4, np.float32)}, asynchronous=False)
    with pytest.raises(SaveFailedError) as info:
        saver.wait(5, timeout=60)
    assert list(info.value.failures) == [1] and info.value.step == 5 and info.value.prefix == prefix


def test_a_failed_shard_leaves_nothing_from_any_entry_point(tmp_path):
    """The same cleanup everywhere: shard 1 cannot be written, shard 0 (written) is removed too."""
    tensors = {v.name: v.numpy() for v in _variables()}
    manager = CheckpointManager(str(tmp_path / "m"))
    for name, save in [("w", lambda p: write_checkpoint(p + "-7", tensors, num_shards=2)),
                       ("s", lambda p: Saver(_variables(), num_shards=2).save(p, global_step=7)),
                       ("m", lambda p: manager.save(tensors, 7, num_shards=2))]:
        directory = tmp_path / name
        prefix = str(directory / "model.ckpt")
        os.makedirs(bundle.data_filename(prefix + "-7", 1, 2))  # a directory where shard 1 goes
        with pytest.raises(SaveFailedError) as info:
            save(prefix)
        assert list(info.value.failures) == [1], name
        assert sorted(os.listdir(directory)) == ["model.ckpt-7.data-00001-of-00002"], name  # only the obstacle


def test_plan_rejects_zero_shards():
    with pytest.raises(ValueError, match="num_shards"):
        pipeline.plan_shards({"a": 1}, 0)


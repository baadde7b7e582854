"""Save failures injected in a real fsspec filesystem (``faulty://``): one error, nothing committed."""

from __future__ import annotations

import errno
import warnings

import numpy as np
import pytest

from orchestrator.checkpoint import reader, state
from orchestrator.checkpoint.errors import SaveFailedError, StateUpdateError
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.saver import Saver
from orchestrator.checkpoint.variables import Variable
from tests.checkpoint.faulty_fs import FaultPlan, FaultyFileSystem, files, injected, network_error

ROOT = "faulty://run/ckpt"


@pytest.fixture(autouse=True)
def clean_faulty_fs():
    FaultyFileSystem.reset()
    yield
    FaultyFileSystem.reset()


def tensors(step: int, count: int = 6) -> dict[str, np.ndarray]:
    return {f"layer{i}/w": np.full((4, 4), step * 100 + i, np.float32) for i in range(count)}


def contents(paths):
    fs = FaultyFileSystem()
    return {p: fs.cat_file(p) for p in paths}


@pytest.fixture
def manager_with_one_checkpoint():
    manager = CheckpointManager(ROOT, max_to_keep=3)
    manager.save(tensors(1), step=1, num_shards=3)
    return manager, files(ROOT)


def assert_previous_is_latest_and_intact(manager, before):
    assert files(ROOT) == before
    assert manager.latest_checkpoint == manager.prefix_for(1)
    assert state.latest_checkpoint(ROOT) == manager.prefix_for(1)
    reader.CheckpointReader(manager.prefix_for(1)).verify()
    assert CheckpointManager(ROOT, max_to_keep=3).latest_checkpoint == manager.prefix_for(1)


def test_enospc_in_one_shard_fails_the_whole_save(manager_with_one_checkpoint):
    manager, before = manager_with_one_checkpoint
    snapshot = contents(before)
    with injected(FaultPlan().fail_write(r"model\.ckpt-2\.data-00001-of-00003", errno.ENOSPC)) as plan:
        with pytest.raises(SaveFailedError) as info:
            manager.save(tensors(2), step=2, num_shards=3)
    assert plan.fired == 1
    assert list(info.value.failures) == [1]
    assert info.value.failures[1].errno == errno.ENOSPC
    assert "shard 1: OSError: [Errno 28]" in str(info.value) and "model.ckpt-2" in str(info.value)
    assert_previous_is_latest_and_intact(manager, before)
    assert contents(before) == snapshot


def test_every_failed_shard_is_listed_with_its_own_cause(manager_with_one_checkpoint):
    manager, before = manager_with_one_checkpoint
    plan = (FaultPlan().fail_open(r"model\.ckpt-2\.data-00000-of-", errno.EACCES)
            .fail_write_with(r"model\.ckpt-2\.data-00002-of-", network_error))
    with injected(plan), pytest.raises(SaveFailedError) as info:
        manager.save(tensors(2), step=2, num_shards=3)
    failures = info.value.failures
    assert sorted(failures) == [0, 2]
    assert isinstance(failures[0], PermissionError)
    assert isinstance(failures[2], ConnectionResetError)
    assert "shard 0: PermissionError" in str(info.value) and "shard 2: ConnectionResetError" in str(info.value)
    assert_previous_is_latest_and_intact(manager, before)


def test_nth_write_of_a_shard_fails(manager_with_one_checkpoint):
    manager, before = manager_with_one_checkpoint
    with injected(FaultPlan().fail_write(r"model\.ckpt-2\.data-00000-of-00001", errno.EIO, nth=4)) as plan:
        with pytest.raises(SaveFailedError) as info:
            manager.save(tensors(2), step=2)  # one shard, six tensors: six writes
    assert plan.rules[0].calls == 4 and plan.fired == 1
    assert info.value.failures[0].errno == errno.EIO
    assert_previous_is_latest_and_intact(manager, before)


def test_silent_short_write_is_caught_before_the_commit_point(manager_with_one_checkpoint):
    manager, before = manager_with_one_checkpoint
    with injected(FaultPlan().short_write(r"model\.ckpt-2\.data-00001-of-00002", nth=2)):
        with pytest.raises(SaveFailedError) as info:
            manager.save(tensors(2), step=2, num_shards=2)
    assert list(info.value.failures) == [1]
    assert "short write" in str(info.value)
    assert_previous_is_latest_and_intact(manager, before)


def test_failing_rename_of_the_index_commits_nothing(manager_with_one_checkpoint):
    manager, before = manager_with_one_checkpoint
    with injected(FaultPlan().fail_rename(r"model\.ckpt-2\.index\.tmp-")):
        with pytest.raises(SaveFailedError) as info:
            manager.save(tensors(2), step=2, num_shards=2)
    assert list(info.value.failures) == ["index"]
    assert_previous_is_latest_and_intact(manager, before)


def test_training_goes_on_after_a_failed_save(manager_with_one_checkpoint):
    manager, _ = manager_with_one_checkpoint
    with injected(FaultPlan().fail_write(r"model\.ckpt-2\.data-", errno.ENOSPC, sticky=True)):
        with pytest.raises(SaveFailedError):
            manager.save(tensors(2), step=2, num_shards=2)
    prefix = manager.save(tensors(3), step=3, num_shards=2)
    assert manager.latest_checkpoint == prefix == state.latest_checkpoint(ROOT)
    assert manager.checkpoints == [manager.prefix_for(1), manager.prefix_for(3)]
    assert reader.CheckpointReader(prefix).get_tensor("layer5/w")[0, 0] == 305


def test_saver_save_failure_leaves_state_untouched():
    var = Variable("x", np.arange(4, dtype=np.float32))
    saver = Saver([var], num_shards=2)
    first = saver.save(ROOT + "/model.ckpt", global_step=1)
    before = files(ROOT)
    with injected(FaultPlan().fail_write(r"model\.ckpt-2\.data-00000", errno.ENOSPC)):
        with pytest.raises(SaveFailedError) as info:
            saver.save(ROOT + "/model.ckpt", global_step=2)
    assert list(info.value.failures) == [0]
    assert files(ROOT) == before
    assert state.latest_checkpoint(ROOT) == first


def test_state_file_failure_after_the_commit_point_is_rolled_forward(manager_with_one_checkpoint):
    manager, _ = manager_with_one_checkpoint
    with injected(FaultPlan().fail_rename(r"/checkpoint\.tmp-")):
        with pytest.raises(StateUpdateError, match="model.ckpt-2 is committed"):  # typed, not a raw OSError
            manager.save(tensors(2), step=2)
    assert state.latest_checkpoint(ROOT) == manager.prefix_for(1)  # the state update was lost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restarted = CheckpointManager(ROOT, max_to_keep=3)
    assert any("adopting committed" in str(w.message) for w in caught)
    assert restarted.latest_checkpoint == manager.prefix_for(2)  # the index was the commit point
    assert state.latest_checkpoint(ROOT) == manager.prefix_for(2)
    reader.CheckpointReader(restarted.latest_checkpoint).verify()


@pytest.mark.parametrize("target, part", [(r"model\.ckpt-2\.data-00001-of-00002", 1),
                                          (r"model\.ckpt-2\.index", "index")])
def test_failed_fsync_fails_the_save(manager_with_one_checkpoint, target, part):
    """Issue 14 item 7: an EIO at fsync was swallowed and the file renamed into place as if durable."""
    manager, before = manager_with_one_checkpoint
    with injected(FaultPlan().fail_fsync(target, errno.EIO)) as plan:
        with pytest.raises(SaveFailedError) as info:
            manager.save(tensors(2), step=2, num_shards=2)
    assert plan.fired == 1 and list(info.value.failures) == [part]
    assert "[Errno 5]" in str(info.value)
    assert_previous_is_latest_and_intact(manager, before)


def test_failed_fsync_fails_every_entry_point(manager_with_one_checkpoint):
    from orchestrator.checkpoint.writer import write_checkpoint

    var = Variable("x", np.arange(4, dtype=np.float32))
    with injected(FaultPlan().fail_fsync(r"model\.ckpt-2\.data-", errno.ENOSPC, sticky=True)):
        with pytest.raises(SaveFailedError, match="shard 0"):
            Saver([var]).save(ROOT + "/model.ckpt", global_step=2)
        with pytest.raises(SaveFailedError, match="shard 0"):
            write_checkpoint(ROOT + "/model.ckpt-2", {"x": var})
    assert [f for f in files(ROOT) if "model.ckpt-2" in f] == []


def test_failed_fsync_of_the_state_file_is_a_typed_error_after_the_commit_point(manager_with_one_checkpoint):
    manager, _ = manager_with_one_checkpoint
    with injected(FaultPlan().fail_fsync(r"/checkpoint\.tmp-", errno.EIO)):
        with pytest.raises(StateUpdateError) as info:
            manager.save(tensors(2), step=2)
    assert info.value.prefix == manager.prefix_for(2) and "[Errno 5]" in str(info.value)
    assert state.latest_checkpoint(ROOT) == manager.prefix_for(1)  # the state file was not replaced


@pytest.mark.parametrize("with_step", [False, True])
def test_saver_failing_over_the_same_prefix_keeps_the_previous_checkpoint_whole(with_step):
    # TF1's `saver.save(sess, "model.ckpt")` (no global_step) saves to one prefix every time:
    # a failed re-save must not destroy the checkpoint it was about to replace.
    var = Variable("x", np.arange(4, dtype=np.float32))
    saver = Saver([var, Variable("y", np.ones(3, np.float32))], num_shards=2)
    step = 7 if with_step else None
    first = saver.save(ROOT + "/model.ckpt", global_step=step)
    before = contents(files(ROOT))
    var.assign(np.full(4, 9, np.float32))
    with injected(FaultPlan().fail_write(r"model\.ckpt.*\.data-00001-of-00002", errno.ENOSPC)) as plan:
        with pytest.raises(SaveFailedError) as info:
            saver.save(ROOT + "/model.ckpt", global_step=step)
    assert plan.fired == 1
    assert info.value.prefix == first
    assert contents(files(ROOT)) == before
    assert state.latest_checkpoint(ROOT) == first
    restored = Variable("x", np.zeros(4, np.float32))
    Saver([restored]).restore(first)
    assert restored.numpy().tolist() == [0, 1, 2, 3]


def test_saver_over_the_same_prefix_replaces_it_when_the_save_succeeds():
    var = Variable("x", np.arange(4, dtype=np.float32))
    first = Saver([var, Variable("y", np.ones(3, np.float32))], num_shards=3).save(ROOT + "/model.ckpt")
    var.assign(np.full(4, 9, np.float32))
    assert Saver([var], num_shards=2).save(ROOT + "/model.ckpt") == first
    with reader.CheckpointReader(first) as ckpt:
        ckpt.verify()
        assert ckpt.get_tensor("x").tolist() == [9, 9, 9, 9]
        assert ckpt.keys() == ["x"]
    assert sorted(p.rsplit("/", 1)[1] for p in files(ROOT)) == [
        "checkpoint", "model.ckpt.data-00000-of-00002", "model.ckpt.data-00001-of-00002", "model.ckpt.index"]

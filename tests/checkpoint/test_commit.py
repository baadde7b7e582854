"""The commit protocol: ordering, cleanup of uncommitted leftovers, state recovery."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest

from orchestrator.checkpoint import bundle, commit, pipeline, reader, state
from orchestrator.checkpoint.errors import CheckpointNotFoundError, SaveFailedError
from orchestrator.checkpoint.manager import CheckpointManager, list_checkpoints
from orchestrator.checkpoint.storage import Storage


def local(tmp_path):
    storage, directory = Storage.for_path(str(tmp_path))
    return storage, directory


def write(prefix: str, storage, value: float = 1.0, num_shards: int = 1) -> list:
    tensors = {f"t{i}": np.full(3, value, np.float32) for i in range(num_shards)}
    return pipeline.save(storage, prefix, tensors, num_shards)


def test_plan_shards_balances_bytes_largest_first():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10}
    assert pipeline.plan_shards(sizes, 2) == [["a", "d"], ["b", "c"]]
    assert pipeline.plan_shards(sizes, 5)[4] == []  # more shards than tensors: empty shards are fine


def test_step_of_and_meta_path():
    assert commit.step_of("/d/model.ckpt-1000") == 1000
    assert commit.step_of("/d/model.ckpt") is None
    assert commit.meta_path("/d/model.ckpt-7-00000-of-00002") == "/d/model.ckpt-7.meta"


def test_delete_removes_index_before_data(tmp_path):
    storage, directory = local(tmp_path)
    prefix = os.path.join(directory, "model.ckpt-1")
    write(prefix, storage, num_shards=2)
    seen = []

    def observe(phase):
        seen.append((phase, sorted(os.listdir(tmp_path))))

    commit.delete_checkpoint(prefix, storage, on_phase=observe)
    assert seen == [("deleting", ["model.ckpt-1.data-00000-of-00002", "model.ckpt-1.data-00001-of-00002"])]
    assert os.listdir(tmp_path) == []


def test_cleanup_removes_uncommitted_data_and_temp_files_only(tmp_path):
    storage, directory = local(tmp_path)
    kept = os.path.join(directory, "model.ckpt-1")
    write(kept, storage)
    orphan = os.path.join(directory, "model.ckpt-2")
    storage.write_bytes(bundle.data_filename(orphan, 0, 2), b"partial")
    (tmp_path / "checkpoint.tmp-0123456789ab").write_bytes(b"half a state file")
    (tmp_path / "model.ckpt-2.index.tmp-ba9876543210").write_bytes(b"half an index")
    (tmp_path / "README.tmp-notours").write_bytes(b"foreign")
    (tmp_path / "other.data").write_bytes(b"foreign")
    removed = commit.cleanup_uncommitted(directory, storage)
    assert sorted(os.path.basename(p) for p in removed) == [
        "checkpoint.tmp-0123456789ab", "model.ckpt-2.data-00000-of-00002", "model.ckpt-2.index.tmp-ba9876543210"]
    assert sorted(os.listdir(tmp_path)) == ["README.tmp-notours", "model.ckpt-1.data-00000-of-00001",
                                            "model.ckpt-1.index", "other.data"]
    reader.CheckpointReader(kept).verify()


def test_cleanup_removes_stale_shard_counts_of_a_committed_prefix(tmp_path):
    storage, directory = local(tmp_path)
    prefix = os.path.join(directory, "model.ckpt-3")
    storage.write_bytes(bundle.data_filename(prefix, 0, 1), b"from an older, uncommitted 1-shard save")
    write(prefix, storage, num_shards=2)
    commit.cleanup_uncommitted(directory, storage)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-3.data-00000-of-00002", "model.ckpt-3.data-00001-of-00002",
                                            "model.ckpt-3.index"]


def test_commit_index_refuses_missing_shard_and_removes_the_others(tmp_path):
    storage, directory = local(tmp_path)
    prefix = os.path.join(directory, "model.ckpt-4")
    results = pipeline.write_shards(storage, prefix, {"a": np.ones(4), "b": np.ones(4)}, 2)
    os.remove(results[1].data_path)  # e.g. a worker's disk lost the file
    with pytest.raises(SaveFailedError) as info:
        commit.commit_index(prefix, results, storage)
    assert list(info.value.failures) == [1]
    assert os.listdir(tmp_path) == []


def test_save_failed_error_pickles_with_its_failures():
    error = SaveFailedError("/d/model.ckpt-5", {0: OSError(28, "No space left on device"), "index": ValueError("x")})
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert "shard 0: OSError: [Errno 28] No space left on device" in str(copy)
    assert set(copy.failures) == {0, "index"} and copy.prefix == "/d/model.ckpt-5"


def accept_ours(prefix: str) -> bool:
    return os.path.basename(prefix).startswith("model.ckpt-")


def test_recover_missing_state_from_committed_checkpoints(tmp_path):
    storage, directory = local(tmp_path)
    for step in (2, 10, 3):
        write(os.path.join(directory, f"model.ckpt-{step}"), storage)
    with pytest.warns(RuntimeWarning, match="recovered 3 committed"):
        recovery = commit.recover_state(directory, storage, accept=accept_ours)
    assert recovery.rebuilt
    assert recovery.state.model_checkpoint_path == os.path.join(directory, "model.ckpt-10")
    assert [commit.step_of(p) for p in recovery.state.all_model_checkpoint_paths] == [2, 3, 10]


def test_recover_unparseable_state_names_the_file(tmp_path):
    storage, directory = local(tmp_path)
    write(os.path.join(directory, "model.ckpt-1"), storage)
    (tmp_path / "checkpoint").write_bytes(b"model_checkpoint_path: \x00\xff garbage {{")
    with pytest.warns(RuntimeWarning, match="state file 'checkpoint'.*unreadable"):
        recovery = commit.recover_state(directory, storage, accept=accept_ours)
    assert recovery.state.model_checkpoint_path == os.path.join(directory, "model.ckpt-1")


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_state_pointing_at_a_broken_index_falls_back_with_a_warning(tmp_path, damage):
    storage, directory = local(tmp_path)
    good, bad = (os.path.join(directory, f"model.ckpt-{s}") for s in (1, 2))
    write(good, storage)
    write(bad, storage, value=2.0)
    state.update_checkpoint_state(directory, bad, [good, bad], [1.0, 2.0], 0.5)
    index = bundle.index_filename(bad)
    if damage == "missing":
        os.remove(index)
    elif damage == "truncated":
        data = open(index, "rb").read()
        open(index, "wb").write(data[: len(data) // 2])
    else:
        open(index, "wb").write(os.urandom(200))
    with pytest.warns(RuntimeWarning, match="skipping .*model.ckpt-2"):
        recovery = commit.recover_state(directory, storage, accept=accept_ours)
    assert recovery.skipped == (bad,)
    assert recovery.state.model_checkpoint_path == good
    assert recovery.state.all_model_checkpoint_paths == [good]
    assert recovery.timestamps[good] == 1.0


def test_committed_checkpoint_newer_than_state_is_adopted(tmp_path):
    storage, directory = local(tmp_path)
    old, new = (os.path.join(directory, f"model.ckpt-{s}") for s in (1, 2))
    write(old, storage)
    state.update_checkpoint_state(directory, old, [old], [1.0], 0.5)
    write(new, storage)  # crash after the index, before the state file update
    write(os.path.join(directory, "other-9"), storage)  # not ours: never adopted
    with pytest.warns(RuntimeWarning, match="adopting committed .*model.ckpt-2"):
        recovery = commit.recover_state(directory, storage, accept=accept_ours)
    assert recovery.state.all_model_checkpoint_paths == [old, new]
    assert recovery.adopted == (new,)


def test_manager_start_repairs_state_and_cleans_leftovers(tmp_path):
    storage, directory = local(tmp_path)
    for step in (1, 2):
        write(os.path.join(directory, f"model.ckpt-{step}"), storage)
    state.update_checkpoint_state(directory, os.path.join(directory, "model.ckpt-7"), None, None, None)
    storage.write_bytes(bundle.data_filename(os.path.join(directory, "model.ckpt-3"), 0, 1), b"orphan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = CheckpointManager(directory)
    assert any("skipping" in str(w.message) and "model.ckpt-7" in str(w.message) for w in caught)
    assert manager.latest_checkpoint == os.path.join(directory, "model.ckpt-2")
    assert state.latest_checkpoint(directory) == manager.latest_checkpoint  # repaired on storage too
    assert not os.path.exists(bundle.data_filename(os.path.join(directory, "model.ckpt-3"), 0, 1))


@pytest.mark.timeout(60)
def test_a_forged_shard_count_is_named_without_visiting_every_shard(tmp_path):
    # 6 header bytes claiming 2**31-1 data files: `orchestrator ls` and a manager's start-up
    # used to list and stat every one of them (hours) before calling the checkpoint broken
    writer_prefix = str(tmp_path / "model.ckpt-1")
    pipeline.save(Storage.for_path(writer_prefix)[0], writer_prefix, {"v": np.zeros(2)}, 1)
    (tmp_path / "model.ckpt-2.index").write_bytes(bundle.build_index_bytes({}, 2**31 - 1))
    with pytest.raises(CheckpointNotFoundError, match=r"model\.ckpt-2\.data-00000-of-2147483647"):
        commit.check_committed(str(tmp_path / "model.ckpt-2"), Storage.for_path(str(tmp_path))[0])
    rows = {info.step: info for info in list_checkpoints(str(tmp_path))}
    assert rows[1].problem is None and "missing" in rows[2].problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert CheckpointManager(str(tmp_path)).latest_checkpoint == str(tmp_path / "model.ckpt-1")

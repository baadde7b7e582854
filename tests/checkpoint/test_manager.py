"""CheckpointManager: TF CheckpointManager retention + keep-best, persisted across restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from orchestrator.checkpoint import bundle, reader, state
from orchestrator.checkpoint.manager import CheckpointManager, list_checkpoints
from orchestrator.checkpoint.saver import Saver
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.variables import Variable

HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def tensors(step: int) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), step, np.float32), "global_step": np.array(step, np.int64)}


def steps_on_disk(directory) -> list[int]:
    names = [f for f in os.listdir(directory) if f.endswith(".index")]
    return sorted(int(f[len("model.ckpt-"):-len(".index")]) for f in names if f.startswith("model.ckpt-"))


def test_save_writes_numbered_checkpoint_and_state(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    prefix = manager.save(tensors(10), step=10)
    assert prefix == manager.prefix_for(10) == str(tmp_path / "model.ckpt-10")
    assert manager.latest_checkpoint == prefix
    assert state.latest_checkpoint(str(tmp_path)) == prefix
    assert reader.CheckpointReader(prefix).get_tensor("w")[0, 0] == 10
    current = state.get_checkpoint_state(str(tmp_path))
    assert current.all_model_checkpoint_timestamps == [pytest.approx(manager._clock(), abs=5)]


def test_max_to_keep_five_leaves_exactly_five_newest_plus_preserved(tmp_path):
    clock = Clock(0.0)
    manager = CheckpointManager(str(tmp_path), max_to_keep=5, keep_checkpoint_every_n_hours=1.0, clock=clock)
    for step in range(1, 21):  # one save every 15 minutes for 5 hours
        clock.now = step * 900.0
        manager.save(tensors(step), step)
    assert manager.checkpoints == [manager.prefix_for(s) for s in range(16, 21)]
    preserved = [4, 8, 12]  # first expired checkpoint at least 1 h after the last preserved one
    assert manager.preserved_checkpoints == [manager.prefix_for(s) for s in preserved]
    assert steps_on_disk(tmp_path) == preserved + list(range(16, 21))
    assert state.get_checkpoint_state(str(tmp_path)).last_preserved_timestamp == 12 * 900.0


def test_max_to_keep_none_keeps_everything(tmp_path):
    manager = CheckpointManager(str(tmp_path), max_to_keep=None)
    for step in range(8):
        manager.save(tensors(step), step)
    assert steps_on_disk(tmp_path) == list(range(8))
    assert len(manager.checkpoints) == 8


def test_latest_and_retention_survive_a_restart_in_a_new_process(tmp_path):
    clock = Clock(0.0)
    first = CheckpointManager(str(tmp_path), max_to_keep=3, keep_checkpoint_every_n_hours=1.0, clock=clock)
    for step in range(1, 6):
        clock.now = step * 1000.0
        first.save(tensors(step), step)
    code = ("import json,sys; from orchestrator.checkpoint.manager import CheckpointManager;"
            "m = CheckpointManager(sys.argv[1], max_to_keep=3, keep_checkpoint_every_n_hours=1.0,"
            " clock=lambda: 5500.0);"
            "print(json.dumps([m.latest_checkpoint, m.checkpoints, m.preserved_checkpoints, m._last_preserved]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=os.getcwd(), check=True).stdout
    latest, tracked, preserved, last_preserved = json.loads(out)
    assert latest == first.latest_checkpoint == first.prefix_for(5)
    assert tracked == first.checkpoints and preserved == first.preserved_checkpoints
    assert last_preserved == first._last_preserved
    # and retention continues where it stopped, in a restarted manager
    second = CheckpointManager(str(tmp_path), max_to_keep=3, keep_checkpoint_every_n_hours=1.0, clock=clock)
    for step in range(6, 10):
        clock.now = step * 1000.0
        second.save(tensors(step), step)
    assert second.checkpoints == [second.prefix_for(s) for s in (7, 8, 9)]
    assert steps_on_disk(tmp_path) == sorted({int(p.rsplit("-", 1)[1]) for p in second.preserved_checkpoints}
                                             | {7, 8, 9})


def test_files_not_in_the_state_are_left_alone(tmp_path):
    foreign = Saver([Variable("x", np.zeros(1))]).save(str(tmp_path / "other.ckpt"), write_state=False)
    old = Saver([Variable("x", np.zeros(1))]).save(str(tmp_path / "model.ckpt"), global_step=0,
                                                   write_state=False)
    (tmp_path / "notes.txt").write_text("keep me")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the manager reports the state it rebuilds
        manager = CheckpointManager(str(tmp_path), max_to_keep=1)
    for step in range(1, 5):
        manager.save(tensors(step), step)
    assert os.path.exists(bundle.index_filename(foreign))
    assert os.path.exists(bundle.index_filename(old))
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert steps_on_disk(tmp_path) == [0, 4]


def test_clock_going_backwards_never_deletes(tmp_path):
    clock = Clock(10 * HOUR)
    manager = CheckpointManager(str(tmp_path), max_to_keep=2, clock=clock)
    for step in range(3):
        clock.now = 10 * HOUR + step
        manager.save(tensors(step), step)
    assert steps_on_disk(tmp_path) == [1, 2]
    clock.now = 5 * HOUR  # NTP step backwards by five hours
    for step in range(3, 6):
        manager.save(tensors(step), step)
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4, 5]
    clock.now = 11 * HOUR  # caught up: normal retention resumes
    manager.save(tensors(6), 6)
    assert steps_on_disk(tmp_path) == [5, 6]


def test_keep_best_by_metric_also_after_restart(tmp_path):
    clock = Clock()
    losses = [0.9, 0.3, 0.8, 0.1, 0.7, 0.6, 0.5]

    def make():
        return CheckpointManager(str(tmp_path), max_to_keep=2, best_metric="loss", best_mode="min",
                                 keep_best=2, clock=clock)

    manager = make()
    for step, loss in enumerate(losses[:4]):
        clock.now += 60
        manager.save(tensors(step), step, metrics={"loss": loss})
    manager = make()  # metrics come back from the sidecar
    for step, loss in enumerate(losses[4:], start=4):
        clock.now += 60
        manager.save(tensors(step), step, metrics={"loss": loss})
    assert steps_on_disk(tmp_path) == [1, 3, 5, 6]
    reasons = {info.step: info.reasons for info in manager.describe()}
    assert reasons == {1: ["best(loss)"], 3: ["best(loss)"], 5: ["latest-2"], 6: ["latest-2"]}


def test_describe_and_list_checkpoints_report_size_shards_and_reasons(tmp_path):
    clock = Clock(0.0)
    manager = CheckpointManager(str(tmp_path), max_to_keep=2, keep_checkpoint_every_n_hours=1.0, clock=clock)
    for step in range(1, 6):
        clock.now = step * 1800.0
        manager.save(tensors(step), step, num_shards=2)
    before = sorted(os.listdir(tmp_path))
    rows = list_checkpoints(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before  # listing changes nothing
    assert [r.step for r in rows] == [2, 4, 5]
    assert [r.reasons for r in rows] == [["every-n-hours"], ["latest-2"], ["latest-2"]]
    assert all(r.num_shards == 2 for r in rows)
    prefix = manager.prefix_for(5)
    expected = sum(os.path.getsize(str(tmp_path / f)) for f in os.listdir(tmp_path)
                   if f.startswith("model.ckpt-5."))
    assert rows[-1].size_bytes == expected and rows[-1].prefix == prefix
    assert rows[-1].timestamp == 5 * 1800.0
    assert manager.describe() == rows


def test_save_from_a_saver_and_restore_or_initialize(tmp_path):
    variables = [Variable("dense/kernel", np.ones((2, 2), np.float32)), Variable("dense/bias", np.ones(2))]
    manager = CheckpointManager(str(tmp_path))
    assert manager.restore_or_initialize(variables) is None  # nothing yet: caller initializes
    saver = Saver(variables)
    manager.save(saver, step=1)
    variables[0].assign(np.full((2, 2), 5.0))
    manager.save(saver, step=2)
    fresh = [Variable("dense/kernel", np.zeros((2, 2), np.float32)), Variable("dense/bias", np.zeros(2))]
    restored = CheckpointManager(str(tmp_path)).restore_or_initialize(Saver(fresh))
    assert restored == manager.prefix_for(2)
    np.testing.assert_array_equal(fresh[0].numpy(), np.full((2, 2), 5.0))
    seen = []
    assert CheckpointManager(str(tmp_path)).restore_or_initialize(seen.append) == manager.prefix_for(2)
    assert seen == [manager.prefix_for(2)]


def test_commit_of_shards_written_elsewhere(tmp_path):
    manager = CheckpointManager(str(tmp_path), max_to_keep=2)
    storage, _ = Storage.for_path(str(tmp_path))
    for step in range(3):
        prefix = manager.prefix_for(step)
        results = []
        for shard in range(3):  # as three workers would, each knowing only its own shard
            writer = bundle.ShardWriter(prefix, shard, 3, storage)
            writer.add(f"part{shard}", np.full(4, step * 10 + shard, np.int32))
            results.append(writer.finish())
        assert manager.commit(step, results, metrics={"loss": 1.0}) == prefix
    assert manager.checkpoints == [manager.prefix_for(1), manager.prefix_for(2)]
    ckpt = reader.CheckpointReader(manager.latest_checkpoint)
    assert [int(ckpt.get_tensor(f"part{i}")[0]) for i in range(3)] == [20, 21, 22]
    assert steps_on_disk(tmp_path) == [1, 2]
    assert not [f for f in os.listdir(tmp_path) if f.startswith("model.ckpt-0")]


def test_manager_round_trip_and_restart_on_every_backend(any_root):
    root, options = any_root
    clock = Clock()
    manager = CheckpointManager(root, max_to_keep=2, storage_options=options, clock=clock)
    for step in range(4):
        clock.now += 10
        manager.save(tensors(step), step, metrics={"loss": float(step)})
    again = CheckpointManager(root, max_to_keep=2, storage_options=options, clock=clock)
    assert again.latest_checkpoint == manager.prefix_for(3)
    assert again.checkpoints == [manager.prefix_for(2), manager.prefix_for(3)]
    assert [r.step for r in list_checkpoints(root, storage_options=options)] == [2, 3]
    value = reader.CheckpointReader(again.latest_checkpoint, storage_options=options).get_tensor("w")
    assert value[0, 0] == 3


def test_invalid_configuration_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="best_metric"):
        CheckpointManager(str(tmp_path), keep_best=2)
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointManager(str(tmp_path), best_metric="loss", keep_best=1, best_mode="smallest")
    with pytest.raises(ValueError, match="keep_checkpoint_every_n_hours"):
        CheckpointManager(str(tmp_path), keep_checkpoint_every_n_hours=0)


def test_saving_the_same_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(str(tmp_path / "new-dir"), max_to_keep=3)
    manager.save(tensors(1), step=1, num_shards=2)
    with pytest.warns(RuntimeWarning, match="overwriting existing checkpoint .*model.ckpt-1"):
        manager.save({"w": np.full((2, 3), 7, np.float32)}, step=1)
    assert manager.checkpoints == [manager.prefix_for(1)]
    assert sorted(os.listdir(tmp_path / "new-dir")) == [
        "checkpoint", "checkpoint.manager.json", "model.ckpt-1.data-00000-of-00001", "model.ckpt-1.index"]
    assert reader.CheckpointReader(manager.prefix_for(1)).get_tensor("w")[0, 0] == 7


def test_restore_mismatch_is_an_error_not_a_fallback(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    manager.save(tensors(1), step=1)
    manager.save(tensors(2), step=2)
    wrong = [Variable("w", np.zeros((3, 3), np.float32))]
    with pytest.raises(ValueError, match=r"'w': checkpoint \(2, 3\) vs variable 'w' \(3, 3\)"):
        manager.restore_or_initialize(wrong)
    assert np.all(wrong[0].numpy() == 0)


def test_best_checkpoint_older_than_last_preserved_stays_tracked_after_restart(tmp_path):
    clock = Clock(0.0)

    def make():
        return CheckpointManager(str(tmp_path), max_to_keep=1, keep_checkpoint_every_n_hours=1.0,
                                 best_metric="loss", keep_best=1, clock=clock)

    manager = make()
    for step, (now, loss) in enumerate([(100.0, 0.1), (4000.0, 0.5), (8000.0, 0.5)], start=1):
        clock.now = now
        manager.save(tensors(step), step, metrics={"loss": loss})
    assert manager.preserved_checkpoints == [manager.prefix_for(2)]
    restarted = make()  # step 1 (t=100) is older than last_preserved (t=4000) but kept as best
    assert restarted.checkpoints == [manager.prefix_for(1), manager.prefix_for(3)]
    clock.now = 9000.0
    restarted.save(tensors(4), 4, metrics={"loss": 0.05})  # a new best: step 1 expires
    assert steps_on_disk(tmp_path) == [2, 3, 4]
    assert restarted.preserved_checkpoints == [manager.prefix_for(2), manager.prefix_for(3)]


def test_sidecar_nested_past_the_recursion_limit_is_ignored_with_a_warning(tmp_path):
    CheckpointManager(str(tmp_path)).save({"v": np.zeros(2, np.float32)}, step=1)
    (tmp_path / "checkpoint.manager.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.warns(RuntimeWarning, match="ignoring unreadable checkpoint manager sidecar"):
        manager = CheckpointManager(str(tmp_path), max_to_keep=1)
    manager.save({"v": np.ones(2, np.float32)}, step=2)
    assert manager.checkpoints == [str(tmp_path / "model.ckpt-2")]

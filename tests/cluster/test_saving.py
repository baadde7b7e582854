"""Parallel sharded saves: async writes, a failed shard fails the whole save, clean shutdown."""

from __future__ import annotations

import os
import time

import pytest
import ray

from orchestrator.checkpoint import bundle
from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.cluster import coordinator as coordinator_module
from orchestrator.cluster.coordinator import SaveRecord, _InFlightSave
from orchestrator.cluster.errors import CheckpointingFailedError

from .conftest import make_config, with_changes

RECIPE = dict(hidden=(16,), optimizer="adam", learning_rate=1e-3, batch=32)


def step_to(coordinator, step: int) -> None:
    while coordinator.global_step < step:
        coordinator.step_once()


def block_shard(prefix: str, shard: int, num_shards: int) -> str:
    """Make the final name of one data shard an occupied directory: its rename must fail."""
    path = bundle.data_filename(prefix, shard, num_shards)
    os.makedirs(os.path.join(path, "occupied"))
    return path


def test_failed_background_write_fails_that_save_and_training_continues(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=8, save_every=2, async_save=True, **RECIPE)
    coordinator = run_coordinator(config)
    blocked = block_shard(coordinator.manager.prefix_for(4), shard=1, num_shards=2)
    step_to(coordinator, 4)
    coordinator.finish_save()
    failed = coordinator.saves[-1]
    assert failed.step == 4 and failed.asynchronous and not failed.committed
    assert "shard 1" in failed.error and "data-00001-of-00002" in failed.error
    assert coordinator.manager.latest_checkpoint.endswith("model.ckpt-2"), "previous checkpoint stays latest"
    assert not os.path.exists(bundle.data_filename(coordinator.manager.prefix_for(4), 0, 2)), \
        "the shard that was written is removed with its failed save"
    assert os.path.isdir(blocked)
    result = coordinator.run()
    assert result.steps_completed == 8
    assert [os.path.basename(p) for p in result.checkpoints] == ["model.ckpt-2", "model.ckpt-6", "model.ckpt-8"]
    assert result.last_checkpoint.endswith("model.ckpt-8")


def test_failed_synchronous_save_is_reported_the_same_way(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=4, save_every=2, async_save=False, **RECIPE)
    coordinator = run_coordinator(config)
    block_shard(coordinator.manager.prefix_for(2), shard=0, num_shards=2)
    result = coordinator.run()
    assert [(r.step, r.committed) for r in coordinator.saves] == [(2, False), (4, True)]
    assert "shard 0" in coordinator.saves[0].error
    assert result.checkpoints == [coordinator.manager.prefix_for(4)]


def test_async_save_is_committed_whole_with_every_shard(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=3, steps=3, save_every=3, async_save=True, **RECIPE)
    coordinator = run_coordinator(config)
    coordinator.run()
    record = coordinator.saves[-1]
    assert record.committed and record.asynchronous and record.nbytes > 0
    reader = CheckpointReader(record.prefix)
    reader.verify()
    assert reader.num_shards == 3


def test_shutdown_finishes_an_in_flight_save(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=10, save_every=0, async_save=True, **RECIPE)
    coordinator = run_coordinator(config)
    step_to(coordinator, 3)
    record = coordinator.save(synchronous=False)
    coordinator.shutdown()  # the save is still in flight: finished and committed, never half-done
    assert record.committed
    CheckpointReader(record.prefix).verify()
    leftovers = [n for n in os.listdir(tmp_path / "ckpt") if ".tmp-" in n]
    assert leftovers == []


def test_save_policy_by_steps_and_seconds():
    from orchestrator.cluster.coordinator import SavePolicy

    policy = SavePolicy(every_steps=5, every_secs=30.0)
    assert policy.reason(10, seconds_since_save=1.0) == "save_every_steps=5"
    assert policy.reason(11, seconds_since_save=31.0) == "save_every_secs=30.0"
    assert policy.reason(11, seconds_since_save=1.0) is None
    assert SavePolicy(every_steps=0).reason(10, 1e9) is None


def test_hung_shard_writes_share_one_deadline(tmp_path, run_coordinator, monkeypatch):
    """Three shards that never finish fail the save after one timeout, not one per shard."""
    monkeypatch.setattr(coordinator_module, "CONTROL_TIMEOUT_S", 0.0)
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=2, step_timeout_s=1.0, **RECIPE)
    coordinator = run_coordinator(with_changes(config, fault_tolerance={"grace_period_s": 0.5}))

    @ray.remote(num_cpus=0)
    def never_finishes():
        time.sleep(120)

    refs = [never_finishes.remote() for _ in range(3)]
    pending = _InFlightSave(SaveRecord(step=1, prefix="p", asynchronous=False, stall_s=0.0), refs, 0.0, {})
    start = time.monotonic()
    try:
        results, failures = coordinator._collect_shards(pending)
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
    elapsed = time.monotonic() - start
    assert results == [] and sorted(failures) == [0, 1, 2]
    assert all("did not finish within 1.0 s" in why for why in failures.values())
    assert elapsed < 2.0, f"waited {elapsed:.1f} s: each hung shard got its own timeout"


def test_saves_that_keep_failing_fail_the_job(tmp_path, run_coordinator):
    """checkpoint.max_consecutive_failures: a job that cannot checkpoint stops instead of losing work silently."""
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=20, save_every=1, async_save=False, **RECIPE)
    coordinator = run_coordinator(with_changes(config, checkpoint={"max_consecutive_failures": 2}))
    for step in (2, 3):
        block_shard(coordinator.manager.prefix_for(step), shard=1, num_shards=2)
    with pytest.raises(CheckpointingFailedError, match="2 checkpoint saves in a row failed") as info:
        coordinator.run()
    assert info.value.step == 3 and info.value.last_checkpoint.endswith("model.ckpt-1")
    assert "the last 2 step(s) of training are lost" in str(info.value)
    assert [os.path.basename(p) for p in info.value.result.checkpoints] == ["model.ckpt-1"]


def test_final_checkpoint_that_does_not_commit_fails_the_job(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=3, save_every=0, **RECIPE)
    coordinator = run_coordinator(config)
    block_shard(coordinator.manager.prefix_for(3), shard=0, num_shards=2)
    with pytest.raises(CheckpointingFailedError, match="the final checkpoint at step 3 did not commit") as info:
        coordinator.run()
    assert info.value.last_checkpoint is None and "no checkpoint was ever committed" in str(info.value)
    assert "shard 0" in str(info.value)

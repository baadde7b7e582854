"""A dead or failing worker surfaces as WorkerFailedError(rank, cause, step), never as a hang."""

from __future__ import annotations

import os
import pickle
import signal
import time

import pytest
import ray

from orchestrator.checkpoint.errors import SaveFailedError
from orchestrator.cluster.errors import ClusterError, WorkerFailedError
from orchestrator.cluster.shard_save import ShardSaveFailed

from .conftest import RAY_TIMEOUT_S, make_config

RECIPE = dict(hidden=(16,), optimizer="sgd", learning_rate=0.1, batch=32)


def test_killed_worker_is_named_with_its_rank_and_step(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=50, save_every=0, step_timeout_s=30, **RECIPE)
    coordinator = run_coordinator(config)
    coordinator.step_once()
    ray.kill(coordinator.workers[1], no_restart=True)
    with pytest.raises(WorkerFailedError) as info:
        coordinator.run()
    assert info.value.rank == 1 and info.value.step == 1
    assert "died" in info.value.cause


def test_worker_exception_is_reported_with_its_message(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=50, save_every=2, async_save=False, **RECIPE)
    coordinator = run_coordinator(config)
    for _ in range(3):
        coordinator.step_once()
    # a real fault inside rank 0: its state rewinds to the step-2 checkpoint, the others are at step 3
    ray.get(coordinator.workers[0].restore.remote(coordinator.manager.prefix_for(2)), timeout=RAY_TIMEOUT_S)
    with pytest.raises(WorkerFailedError, match="rank 0 failed at step 3") as info:
        coordinator.step_once()
    assert "asked for step 3 but is at step 2" in info.value.cause


def test_failure_during_an_async_save_leaves_nothing_uncommitted(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=50, save_every=0, **RECIPE)
    coordinator = run_coordinator(config)
    coordinator.step_once()
    record = coordinator.save(synchronous=False)
    ray.kill(coordinator.workers[1], no_restart=True)
    with pytest.raises(WorkerFailedError):
        coordinator.run()
    assert not record.committed
    assert not os.path.exists(record.prefix + ".index")
    assert [n for n in os.listdir(tmp_path / "ckpt") if n.startswith("model.ckpt-1")] == []


def test_errors_cross_process_boundaries_intact():
    failed = pickle.loads(pickle.dumps(WorkerFailedError(3, "ActorDiedError: gone", 17)))
    assert (failed.rank, failed.cause, failed.step) == (3, "ActorDiedError: gone", 17)
    assert isinstance(failed, ClusterError) and "rank 3" in str(failed) and "step 17" in str(failed)
    save = pickle.loads(pickle.dumps(SaveFailedError("/d/model.ckpt-5", {1: "OSError: disk full"})))
    assert save.failures == {1: "OSError: disk full"} and "shard 1: OSError: disk full" in str(save)
    assert save.step == 5
    shard = pickle.loads(pickle.dumps(ShardSaveFailed(5, 1, "OSError: disk full", "/d/model.ckpt-5")))
    assert isinstance(shard, SaveFailedError) and (shard.step, shard.rank, shard.cause) == (5, 1, "OSError: disk full")


def test_stuck_worker_times_out_instead_of_hanging(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=50, save_every=0, step_timeout_s=3, **RECIPE)
    coordinator = run_coordinator(config)
    coordinator.step_once()
    pid = coordinator.worker_info[1]["pid"]
    os.kill(pid, signal.SIGSTOP)  # a real hang: the process is frozen
    try:
        begin = time.monotonic()
        with pytest.raises(WorkerFailedError, match="no answer within 3 s") as info:
            coordinator.step_once()
        assert info.value.rank == 1 and info.value.step == 1
        assert (time.monotonic() - begin) / config.fault_tolerance.step_timeout_s < 5, "bounded by the timeout"
    finally:
        os.kill(pid, signal.SIGCONT)

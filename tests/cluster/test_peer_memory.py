"""The peer-memory tier: survivors roll back from memory, replacements restore from a peer's
copy (CRC-checked, same bytes as the committed checkpoint), storage when both copies are gone;
memory-only checkpoints bound the steps lost; the memory the tier holds, measured."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import ray

from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.cluster.errors import WorkerFailedError
from orchestrator.cluster.peer_memory import MemoryTier, MemoryTierError, assign_holders, make_shard

from .conftest import RAY_TIMEOUT_S, assert_bit_identical, make_config, with_changes, worker_state

RECIPE = dict(hidden=(16,), optimizer="adam", learning_rate=3e-3, batch=32)


def _pids(coordinator) -> list[int]:
    return ray.get([w.alive.remote() for w in coordinator.workers], timeout=RAY_TIMEOUT_S)


def _fail(coordinator, *ranks: int) -> WorkerFailedError:
    """SIGKILL the given ranks' processes; the next step fails."""
    for rank in ranks:
        os.kill(coordinator.worker_info[rank]["pid"], signal.SIGKILL)
    with pytest.raises(WorkerFailedError) as info:
        coordinator.run()
    return info.value


def _steps(coordinator, n: int) -> None:
    for _ in range(n):
        coordinator.step_once()


# ---------------------------------------------------------------- no Ray
def test_holders_sit_on_another_node_whenever_possible():
    nodes = ["a", "a", "b", "b"]
    holders = assign_holders(nodes)
    assert sorted(holders) == [0, 1, 2, 3]  # every rank holds exactly one copy
    assert all(nodes[holders[r]] != nodes[r] for r in range(4))
    assert assign_holders(["a", "b"]) == [1, 0]
    assert assign_holders(["a", "a", "a"]) == [1, 2, 0]  # one node: another process at least
    assert assign_holders(["x"]) == [0]


def test_a_damaged_copy_is_refused_and_old_shards_go_once_a_newer_one_is_complete():
    values = {"w": np.arange(6, dtype=np.float32)}
    shard = make_shard(3, 1, 2, {"w": values["w"].copy()}, {"global_step": 3, "iterator": {}, "seed": 0})
    shard.verify()
    damaged = shard.copy()
    damaged.tensors["w"].view(np.uint8)[5] ^= 0x10
    with pytest.raises(MemoryTierError, match="CRC mismatch in \\['w'\\]"):
        damaged.verify()

    tier = MemoryTier()
    tier.put_own(shard)
    tier.complete(3)
    later = make_shard(6, 1, 2, {"w": values["w"] * 2}, {"global_step": 6, "iterator": {}, "seed": 0})
    tier.put_own(later)
    assert tier.own(3).step == 3 and tier.own(6).step == 6  # both until 6 is complete everywhere
    tier.complete(6)
    with pytest.raises(MemoryTierError, match="step 3"):
        tier.own(3, timeout=0)
    assert tier.nbytes()["own"] == later.nbytes


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_bound_one_own_shard_and_one_peer_copy_per_worker(tmp_path):
    """Two ranks' workers in this process (no Ray): the tier's memory, measured as RSS, is one own
    shard plus one peer copy per worker once a memory checkpoint is complete, at most twice that
    while the next one is taken, and it does not grow over many checkpoints."""
    from orchestrator.cluster.worker import TrainWorker

    config = make_config(str(tmp_path / "ckpt"), workers=2, hidden=(1024, 1024), optimizer="adam")
    workers = [TrainWorker(config, rank, 2) for rank in range(2)]
    shard_bytes = sum(sum(a.nbytes for a in w.owned_arrays().values()) for w in workers)  # both ranks
    assert shard_bytes > 10 * 2**20  # big enough to read in RSS
    before = _rss_bytes()
    peak = 0
    for _ in range(6):
        for w in workers:
            w.memory_snapshot(0)
        for source, holder in enumerate(assign_holders(["a", "b"])):
            workers[holder].hold_peer(workers[source].memory_shard(0, timeout=0))
        peak = max(peak, _rss_bytes() - before)
        for w in workers:
            w.memory_complete(0)
        held = [w.memory_nbytes() for w in workers]
        assert sum(h["own"] for h in held) == sum(h["peer"] for h in held) == shard_bytes
    steady = _rss_bytes() - before
    print(f"\npeer tier: shards {shard_bytes / 2**20:.1f} MiB (both ranks); RSS +{steady / 2**20:.1f} MiB "
          f"when complete, peak +{peak / 2**20:.1f} MiB")
    assert steady >= 0.9 * 2 * shard_bytes  # the copies are real memory
    assert peak <= 4 * shard_bytes + 16 * 2**20  # never more than 2 own + 2 peer (+ allocator slack)


# ---------------------------------------------------------------- real Ray workers
def test_replacement_restores_from_a_peer_copy_with_the_checkpoint_files_gone(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=40, save_every=10, **RECIPE)
    coordinator = run_coordinator(config)
    _steps(coordinator, 10)
    coordinator.finish_save()
    coordinator.peers.wait(RAY_TIMEOUT_S)
    prefix = coordinator.manager.latest_checkpoint
    reader = CheckpointReader(prefix)
    committed = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if not n.startswith("_")}
    committed.pop("global_step")
    _steps(coordinator, 3)
    for name in os.listdir(tmp_path / "ckpt"):  # storage cannot be what the restore reads
        if name.startswith("model.ckpt-"):
            os.remove(tmp_path / "ckpt" / name)
    survivor = _pids(coordinator)[0]

    coordinator.heal(_fail(coordinator, 1), start_timeout=RAY_TIMEOUT_S)

    assert coordinator.restore_tier == "peer_memory" and coordinator.global_step == 10
    assert coordinator.workers_replaced == 1 and _pids(coordinator)[0] == survivor
    assert_bit_identical(worker_state(coordinator), committed)  # the committed bytes, from memory
    coordinator.step_once()  # and training goes on
    assert coordinator.global_step == 11


def test_rank_and_the_holder_of_its_copy_both_lost_restore_from_storage(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=3, steps=40, save_every=4, **RECIPE)
    config = with_changes(config, checkpoint={"memory_every_steps": 2})
    coordinator = run_coordinator(config)
    _steps(coordinator, 6)
    coordinator.finish_save()
    assert coordinator.peers.complete_step == 6 and coordinator.committed_step == 4
    holders = coordinator.peers.holders
    survivor = next(r for r in range(3) if r not in (0, holders[0]))
    pid = _pids(coordinator)[survivor]

    coordinator.heal(_fail(coordinator, 0, holders[0]), start_timeout=RAY_TIMEOUT_S)

    assert coordinator.restore_tier == "storage" and coordinator.global_step == 4
    assert coordinator.workers_replaced == 2 and _pids(coordinator)[survivor] == pid
    reader = CheckpointReader(coordinator.manager.latest_checkpoint)
    state = worker_state(coordinator)
    assert all(state[n].tobytes() == reader.get_tensor(n).tobytes() for n in state)


def test_memory_only_checkpoints_lose_at_most_memory_every_steps(tmp_path, run_coordinator):
    """No storage checkpoint before the end: the failure at step 8 goes back to the memory-only
    checkpoint of step 6, and the job still ends with the bits of an uninterrupted run."""
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=12, save_every=0, **RECIPE)
    config = with_changes(config, checkpoint={"memory_every_steps": 3})
    reference = run_coordinator(with_changes(config, checkpoint={"dir": str(tmp_path / "reference")}))
    reference.run()
    coordinator = run_coordinator(config)
    _steps(coordinator, 8)
    assert coordinator.manager.latest_checkpoint is None

    error = _fail(coordinator, 0)
    coordinator.heal(error, start_timeout=RAY_TIMEOUT_S)

    assert coordinator.restore_tier == "peer_memory" and error.step - coordinator.global_step <= 3
    coordinator.run()
    assert_bit_identical(worker_state(coordinator), worker_state(reference))


def test_a_spare_worker_takes_the_lost_rank_and_a_new_spare_starts(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=40, save_every=5, **RECIPE)
    config = with_changes(config, fault_tolerance={"spare_workers": 1})
    coordinator = run_coordinator(config)
    _steps(coordinator, 6)
    [spare] = coordinator.spares
    spare_pid = ray.get(spare.alive.remote(), timeout=RAY_TIMEOUT_S)

    coordinator.heal(_fail(coordinator, 1), start_timeout=RAY_TIMEOUT_S)

    assert _pids(coordinator)[1] == spare_pid and coordinator.worker_info[1]["rank"] == 1
    assert coordinator.restore_tier == "peer_memory" and coordinator.global_step == 5
    assert len(coordinator.spares) == 1 and coordinator.spares[0] is not spare
    coordinator.run()  # to the end, with the spare as rank 1
    reference = run_coordinator(with_changes(config, checkpoint={"dir": str(tmp_path / "reference")},
                                             fault_tolerance={"spare_workers": 0}))
    reference.run()
    assert_bit_identical(worker_state(coordinator), worker_state(reference))

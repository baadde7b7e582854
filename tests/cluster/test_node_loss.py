"""Node loss and elasticity on a real multi-node ``ray.cluster_utils.Cluster``.

The cluster needs its own Ray, separate from the session's ``ray_session``, so the
scenarios run in a child process (this file, run as a script) that prints one JSON
line of results; the tests assert on it.

Scenarios, one cluster (a head without CPUs + three 1-CPU nodes, 1 CPU per worker):
1. workers {min: 2, max: 3}: a node hosting a worker is removed at step 15 -> the job
   continues with M'=2 (resharded restore from step 10); a node is added -> at the next
   checkpoint boundary it grows back to M=3; the job finishes.
2. Ray drains (preemption) a node hosting a worker -> emergency checkpoint, preempted.
3. Ray drains a worker's node with a deadline shorter than a storage save (a spare node
   joins first) -> emergency checkpoint in the memory tier: the worker moves to the spare
   node from its peer's copy, no step is lost, the job finishes without stopping.
4. workers {min: 4, max: 4} on 3 CPUs -> waits min_workers_timeout_s, then a clear error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARK = "NODE_LOSS_RESULT "
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def outcome():
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len(MARK):])


def test_node_removed_job_continues_with_fewer_workers_then_grows_back(outcome):
    elastic = outcome["elastic"]
    assert [a["num_workers"] for a in elastic["attempts"]] == [3, 2, 3]
    assert [a["outcome"] for a in elastic["attempts"]] == ["failed", "resize", "done"]
    assert elastic["restored_steps"][0] is None
    assert elastic["restored_steps"][1] == 10  # M'=2 restored the M=3 checkpoint
    assert elastic["restored_steps"][2] > 20   # grew back from a checkpoint made by M'=2
    assert elastic["steps_completed"] == elastic["total_steps"]
    assert elastic["failures_recovered"] == 1


def test_ray_drain_of_a_worker_node_preempts_with_checkpoint(outcome):
    drained = outcome["drain"]
    assert drained["preempted"] and "draining" in drained["reason"]
    assert drained["last_checkpoint"].endswith(f"model.ckpt-{drained['steps_completed']}")


def test_ray_drain_shorter_than_a_storage_save_moves_the_worker_through_peer_memory(outcome):
    moved = outcome["drain_short"]
    assert not moved["preempted"] and moved["steps_completed"] == moved["total_steps"]
    assert moved["tiers"] == ["peer_memory"] and moved["steps_lost"] == [0]
    assert moved["drained"] not in moved["final_nodes"] and moved["survivor_pid_kept"]


def test_fewer_than_min_workers_waits_then_fails_clearly(outcome):
    short = outcome["insufficient"]
    assert short["error"] == "InsufficientWorkersError"
    assert "workers.min=4" in short["message"]
    assert f"min_workers_timeout_s={TIMEOUT_S:g}" in short["message"]
    assert short["waited_s"] >= TIMEOUT_S


# ---------------------------------------------------------------- the child process

def _write(root: Path, tag: str, workers: str, steps: int, timeout: float = 30.0):
    from orchestrator.config import load_config
    from tests.cluster.test_supervisor import write_job

    path = write_job(root / tag, tag, steps=steps, workers=workers)
    return load_config(path, ["resources.cpus_per_worker=1",
                              f"fault_tolerance.min_workers_timeout_s={timeout}"])


def _node_of(cluster, node_id: str):
    return next(n for n in cluster.list_all_nodes() if n.node_id == node_id)


def _elastic(cluster, root: Path) -> dict:
    from orchestrator.cluster.coordinator import Coordinator
    from orchestrator.cluster.supervisor import Supervisor
    from tests.cluster.test_supervisor import Recorder

    created = []

    def factory(config, num_workers, reporter, resume):
        created.append(Coordinator(config, num_workers=num_workers, reporter=reporter,
                                   resume=resume))
        return created[-1]

    recorder = Recorder()
    supervisor = Supervisor(_write(root, "elastic", "{min: 2, max: 3}", 60), recorder,
                            coordinator_factory=factory)

    def remove_a_worker_node():
        cluster.remove_node(_node_of(cluster, supervisor.coordinator.worker_node_ids[-1]))

    recorder.actions = {15: remove_a_worker_node, 25: lambda: cluster.add_node(num_cpus=1)}
    result = supervisor.run()
    return {"attempts": [{"num_workers": a.num_workers, "outcome": a.outcome.value}
                         for a in supervisor.attempts],
            "restored_steps": [c.restored_from and int(c.restored_from.rsplit("-", 1)[1])
                               for c in created],
            "steps_completed": result.steps_completed, "total_steps": 60,
            "failures_recovered": result.failures_recovered}


def _drain(cluster, root: Path) -> dict:
    import ray
    from ray.core.generated import autoscaler_pb2

    from orchestrator.cluster.supervisor import Supervisor
    from tests.cluster.test_supervisor import Recorder

    recorder = Recorder()
    supervisor = Supervisor(_write(root, "drain", "{min: 1, max: 2}", 200), recorder)
    supervisor.watcher.poll_interval_s = 0.0
    gcs = ray._raylet.GcsClient(address=cluster.address)

    def drain_a_worker_node():
        node_id = supervisor.coordinator.worker_node_ids[0]
        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        accepted, why = gcs.drain_node(node_id, reason, "test preemption",
                                       int(time.time() * 1000) + 60_000)
        assert accepted, why

    recorder.actions = {7: drain_a_worker_node}
    result = supervisor.run()
    return {"preempted": result.preempted, "reason": supervisor.watcher.reason or "",
            "steps_completed": result.steps_completed,
            "last_checkpoint": result.last_checkpoint or ""}


def _drain_short(cluster, root: Path) -> dict:
    import ray
    from ray.core.generated import autoscaler_pb2

    from orchestrator.cluster.supervisor import Supervisor
    from tests.cluster.test_supervisor import Recorder

    cluster.add_node(num_cpus=1)  # the spare the drained worker moves to (a drained node leaves when idle)
    recorder = Recorder()
    supervisor = Supervisor(_write(root, "drain-short", "2", 40), recorder)
    supervisor.watcher.poll_interval_s = 0.0
    gcs = ray._raylet.GcsClient(address=cluster.address)
    seen = {}

    def drain_with_a_short_deadline():  # shorter than any save plus the commit margin
        seen["drained"] = node_id = supervisor.coordinator.worker_node_ids[0]
        seen["survivor"] = supervisor.coordinator.worker_info[1]["pid"]
        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        accepted, why = gcs.drain_node(node_id, reason, "test preemption", int(time.time() * 1000) + 900)
        assert accepted, why

    def look():
        coord = supervisor.coordinator
        seen["final_nodes"] = list(coord.worker_node_ids)
        seen["survivor_pid_kept"] = ray.get(coord.workers[1].alive.remote(), timeout=60) == seen["survivor"]

    recorder.actions = {15: drain_with_a_short_deadline, 35: look}
    result = supervisor.run()
    return {"preempted": result.preempted, "steps_completed": result.steps_completed, "total_steps": 40,
            "tiers": [r.tier for r in supervisor.recoveries], "steps_lost": [r.steps_lost for r in supervisor.recoveries],
            **seen}


def _insufficient(root: Path) -> dict:
    from orchestrator.cluster.supervisor import Supervisor

    supervisor = Supervisor(_write(root, "short", "{min: 4, max: 4}", 20, TIMEOUT_S))
    started = time.monotonic()
    try:
        supervisor.run()
    except Exception as error:  # reported to the parent, which asserts on it
        return {"error": type(error).__name__, "message": str(error),
                "waited_s": time.monotonic() - started}
    return {"error": None, "message": "", "waited_s": time.monotonic() - started}


def main() -> None:
    sys.path.insert(0, str(REPO))
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            results = {"elastic": _elastic(cluster, root), "drain": _drain(cluster, root),
                       "drain_short": _drain_short(cluster, root), "insufficient": _insufficient(root)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(MARK + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()

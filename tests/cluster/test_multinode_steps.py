"""The step loop across nodes: workers on two nodes of a ``ray.cluster_utils.Cluster`` exchange
gradients and parameters directly (TCP between the nodes) and end bit-identical to M=2 on one node.

The cluster needs its own Ray, so the two-node run is a child process (this file run as a
script) that writes every worker's state to an .npz file; the one-node run uses the session's Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.cluster.conftest import assert_bit_identical, make_config, with_changes, worker_state

REPO = Path(__file__).resolve().parents[2]
STEPS = 24
MARK = "MULTINODE_STEPS "


def config_for(directory: str):
    # dropout on and an odd split (33 + 32 examples): the exchange must get every bit right
    return make_config(directory, workers=2, steps=STEPS, hidden=(32,), optimizer="adam", batch=65, keep=(0.9, 0.7))


@pytest.mark.timeout(280)
def test_two_nodes_train_bit_identical_to_one_node(tmp_path, run_coordinator):
    out = tmp_path / "two_nodes.npz"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path / "multi"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1][len(MARK):])
    assert len(set(report["nodes"])) == 2, "one worker per node"
    assert report["exchange"] == "socket" and report["steps"] == STEPS

    coordinator = run_coordinator(config_for(str(tmp_path / "single")))
    coordinator.advance(STEPS)
    with np.load(out) as two_nodes:
        assert_bit_identical({name: two_nodes[name] for name in two_nodes.files}, worker_state(coordinator))


def _child(directory: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.cluster.coordinator import Coordinator

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    coordinator = Coordinator(with_changes(config_for(directory), resources={"cpus_per_worker": 1}))
    try:
        coordinator.start()
        coordinator.advance(STEPS)
        np.savez(out, **worker_state(coordinator))
        print(MARK + json.dumps({"nodes": coordinator.worker_node_ids, "exchange": coordinator.exchange,
                                 "steps": coordinator.global_step}), flush=True)
    finally:
        coordinator.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])

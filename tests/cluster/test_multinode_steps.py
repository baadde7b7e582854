"""The step loop across nodes: workers on two nodes of a ``ray.cluster_utils.Cluster`` exchange
gradients and parameters directly (TCP between the nodes) and end bit-identical to M=2 on one node.

The cluster needs its own Ray: the two-node run is the ``steps`` scenario of
tests/cluster/two_nodes.py (the session's one two-node child process), which writes every
worker's state to an .npz file; the one-node run uses the session's Ray.
"""

from __future__ import annotations

import pytest

import numpy as np

from tests.cluster.conftest import assert_bit_identical, two_node_scenario, worker_state
from tests.cluster.two_nodes import STEPS, steps_config


@pytest.mark.timeout(600)  # the first test to ask for two_nodes waits for the whole child
def test_two_nodes_train_bit_identical_to_one_node(tmp_path, two_nodes, run_coordinator):
    report = two_node_scenario(two_nodes, "steps")
    assert len(set(report["nodes"])) == 2, "one worker per node"
    assert report["exchange"] == "socket" and report["steps"] == STEPS

    coordinator = run_coordinator(steps_config(str(tmp_path / "single")))
    coordinator.advance(STEPS)
    with np.load(report["state"]) as two_node_state:
        assert_bit_identical({name: two_node_state[name] for name in two_node_state.files}, worker_state(coordinator))

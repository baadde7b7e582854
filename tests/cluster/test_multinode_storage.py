"""A local checkpoint path on a multi-node Ray cluster is rejected before anything starts.

Needs its own two-node Ray (ray.cluster_utils.Cluster): the ``storage`` scenario of
tests/cluster/two_nodes.py, run in the session's one two-node child process.
"""

from __future__ import annotations

import pytest

from tests.cluster.conftest import two_node_scenario


@pytest.mark.timeout(600)  # the first test to ask for two_nodes waits for the whole child
def test_local_checkpoint_dir_rejected_on_two_node_cluster(two_nodes):
    result = two_node_scenario(two_nodes, "storage")
    assert result["rejected"] is not None, "a local checkpoint.dir was accepted on two nodes"
    assert "2 alive nodes" in result["rejected"] and "s3://" in result["rejected"]
    assert not result["written"], "nothing was written"

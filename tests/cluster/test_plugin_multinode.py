"""A plug-in module that exists only in the job's directory trains on a real two-node Ray cluster.

The cluster (``ray.cluster_utils.Cluster``: two nodes with one CPU each, one worker each) needs
its own Ray: the job is the ``plugin`` scenario of tests/cluster/two_nodes.py (the session's
one two-node child process), started the way a user starts it: ``orchestrator train
job.yaml`` from the job directory, ``cluster.address`` pointing at the cluster, data (parquet)
and checkpoints on S3 (the moto server of the test session). The plug-in writes down, in
every process that builds it, the node and the file it imported the module from: each worker
must have imported the copy the runtime shipped, on both nodes.
"""

from __future__ import annotations

import pytest

import os

from tests.cluster.conftest import two_node_scenario


@pytest.mark.timeout(600)  # the first test to ask for two_nodes waits for the whole child
def test_plugin_module_from_the_job_directory_imports_on_both_nodes(two_nodes):
    result = two_node_scenario(two_nodes, "plugin")
    assert result["exit_code"] == 0, result
    assert result["latest"].endswith("model.ckpt-12")
    job = result["job"]
    driver = [r for r in result["reports"] if r["node"] == "driver"]
    workers = [r for r in result["reports"] if r["node"] != "driver"]
    assert driver and all(r["file"].startswith(job) for r in driver)       # the driver: the job directory
    assert len({r["node"] for r in workers}) == 2, workers                 # both worker nodes built it ...
    for report in workers:                                                  # ... from the shipped copy
        assert not report["file"].startswith(job) and "runtime_resources" in report["file"], report
        assert report["cwd"] == os.path.dirname(report["file"])

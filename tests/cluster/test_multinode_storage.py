"""A local checkpoint path on a multi-node Ray cluster is rejected before anything starts.

Needs its own two-node Ray (ray.cluster_utils.Cluster), so it runs in a subprocess and
does not disturb the session's Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import ray
    from ray.cluster_utils import Cluster
    from tests.cluster.conftest import make_config
    from orchestrator.cluster.errors import ClusterSetupError
    from orchestrator.cluster.job import run_job

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    checkpoint_dir = sys.argv[1]
    try:
        run_job(make_config(checkpoint_dir, workers=2))
    except ClusterSetupError as exc:
        print("REJECTED:", exc)
    else:
        print("ACCEPTED")
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.timeout(240)
def test_local_checkpoint_dir_rejected_on_two_node_cluster(tmp_path):
    directory = tmp_path / "ckpt"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(directory)], cwd=root, capture_output=True,
                          text=True, timeout=200, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REJECTED:" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "2 alive nodes" in proc.stdout and "s3://" in proc.stdout
    assert not directory.exists(), "nothing was written"

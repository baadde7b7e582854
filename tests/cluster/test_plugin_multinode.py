"""A plug-in module that exists only in the job's directory trains on a real two-node Ray cluster.

The cluster (``ray.cluster_utils.Cluster``: two nodes with one CPU each, one worker each) needs
its own Ray, so the job runs in a child process (this file as a script), started the way a
user starts it: ``orchestrator train job.yaml`` from the job directory, ``cluster.address``
pointing at the cluster, data (parquet) and checkpoints on S3 (the moto server of the test
session). The plug-in writes down, in every process that builds it, the node and the file
it imported the module from: each worker must have imported the copy the runtime shipped,
on both nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARK = "PLUGIN_MULTINODE_RESULT "


@pytest.mark.timeout(400)
def test_plugin_module_from_the_job_directory_imports_on_both_nodes(tmp_path, s3_bucket, s3_options):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path), s3_bucket,
                           json.dumps(s3_options)], cwd=REPO, capture_output=True, text=True, timeout=360,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len(MARK):])
    assert result["exit_code"] == 0, result
    assert result["latest"].endswith("model.ckpt-12")
    job = str(tmp_path / "job")
    driver = [r for r in result["reports"] if r["node"] == "driver"]
    workers = [r for r in result["reports"] if r["node"] != "driver"]
    assert driver and all(r["file"].startswith(job) for r in driver)       # the driver: the job directory
    assert len({r["node"] for r in workers}) == 2, workers                 # both worker nodes built it ...
    for report in workers:                                                  # ... from the shipped copy
        assert not report["file"].startswith(job) and "runtime_resources" in report["file"], report
        assert report["cwd"] == os.path.dirname(report["file"])


# ---------------------------------------------------------------- the child process
def main(root: Path, bucket: str, options: dict) -> None:
    sys.path.insert(0, str(REPO))
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.checkpoint.state import latest_checkpoint
    from orchestrator.cli import main as cli
    from tests.plugin_fixtures import data_yaml, write_data, write_job, write_plugin

    job, reports = root / "job", root / "reports"
    reports.mkdir(parents=True)
    module = write_plugin(job)
    train, evaluation = write_data(f"{bucket}/data", "parquet", options)
    extra = "cluster: {address: CLUSTER}\n"
    config = write_job(job, module, data_yaml("parquet", train, evaluation, options), factory="build_reporting",
                       args=f"{{keep_prob: 0.8, report_to: {reports}}}", workers=2, steps=12, save_every=6,
                       checkpoint_dir=f"{bucket}/ckpt", checkpoint_options=options, extra=extra)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    config.write_text(config.read_text().replace("CLUSTER", cluster.address)
                      .replace("cpus_per_worker: 0.25", "cpus_per_worker: 1"))
    os.chdir(job)
    try:
        code = cli(["train", str(config)])
    finally:
        ray.shutdown()
        cluster.shutdown()
    found = [json.loads(p.read_text()) for p in sorted(reports.iterdir())]
    latest = latest_checkpoint(f"{bucket}/ckpt", storage_options=options) or ""
    print(MARK + json.dumps({"exit_code": code, "reports": found, "latest": latest}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))

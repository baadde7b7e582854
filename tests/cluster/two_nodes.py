"""The two-node scenarios, run in ONE child process on ONE ``ray.cluster_utils.Cluster``.

A cluster needs its own Ray, apart from the test session's, so it lives in a child process
(this file run as a script); starting one costs several seconds of processes on a 2-core
machine, so the scenarios of three test files share it, one after another:

- ``storage``: a local ``checkpoint.dir`` is rejected before anything starts
  (tests/cluster/test_multinode_storage.py);
- ``steps``: the step loop across nodes (TCP between the workers) trains STEPS steps and
  writes every worker's state to an .npz file (tests/cluster/test_multinode_steps.py);
- ``plugin``: ``orchestrator train job.yaml`` from a job directory whose plug-in module
  exists only there, data and checkpoints on S3 (tests/cluster/test_plugin_multinode.py).

The cluster: a head and one more node, one CPU each; jobs ask one CPU per worker, so the two
workers of a job sit on different nodes. Each scenario prints one ``MARK`` line of JSON, or
the traceback it ended with, so one failing scenario does not hide the others.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARK = "TWO_NODES "
STEPS = 24


def steps_config(directory: str):
    """The step-loop scenario's job; the test runs the same job on one node to compare."""
    from tests.cluster.conftest import make_config

    # dropout on and an odd split (33 + 32 examples): the exchange must get every bit right
    return make_config(directory, workers=2, steps=STEPS, hidden=(32,), optimizer="adam", batch=65, keep=(0.9, 0.7))


def storage(root: Path, cluster, bucket: str, options: dict) -> dict:
    import ray

    from orchestrator.cluster.errors import ClusterSetupError
    from orchestrator.cluster.job import run_job
    from tests.cluster.conftest import make_config

    directory = root / "storage" / "ckpt"
    ray.init(address=cluster.address, log_to_driver=False)  # run_job joins the Ray it finds
    try:
        run_job(make_config(str(directory), workers=2))
    except ClusterSetupError as exc:
        return {"rejected": str(exc), "written": directory.exists()}
    finally:
        ray.shutdown()
    return {"rejected": None, "written": directory.exists()}


def steps(root: Path, cluster, bucket: str, options: dict) -> dict:
    import numpy as np
    import ray

    from orchestrator.cluster.coordinator import Coordinator
    from tests.cluster.conftest import with_changes, worker_state

    ray.init(address=cluster.address, log_to_driver=False)
    coordinator = Coordinator(with_changes(steps_config(str(root / "steps" / "ckpt")),
                                           resources={"cpus_per_worker": 1}))
    try:
        coordinator.start()
        coordinator.advance(STEPS)
        np.savez(root / "steps.npz", **worker_state(coordinator))
        return {"nodes": coordinator.worker_node_ids, "exchange": coordinator.exchange,
                "steps": coordinator.global_step, "state": str(root / "steps.npz")}
    finally:
        coordinator.shutdown()
        ray.shutdown()


def plugin(root: Path, cluster, bucket: str, options: dict) -> dict:
    from orchestrator.checkpoint.state import latest_checkpoint
    from orchestrator.cli import main as cli
    from tests.plugin_fixtures import data_yaml, write_data, write_job, write_plugin

    job, reports = root / "job", root / "reports"
    reports.mkdir(parents=True)
    module = write_plugin(job)
    train, evaluation = write_data(f"{bucket}/data", "parquet", options)
    config = write_job(job, module, data_yaml("parquet", train, evaluation, options), factory="build_reporting",
                       args=f"{{keep_prob: 0.8, report_to: {reports}}}", workers=2, steps=12, save_every=6,
                       checkpoint_dir=f"{bucket}/ckpt", checkpoint_options=options,
                       extra=f"cluster: {{address: '{cluster.address}'}}\n")
    config.write_text(config.read_text().replace("cpus_per_worker: 0.25", "cpus_per_worker: 1"))
    here = os.getcwd()
    os.chdir(job)  # started the way a user starts it: from the job directory
    try:
        code = cli(["train", str(config)])
    finally:
        os.chdir(here)
    found = [json.loads(p.read_text()) for p in sorted(reports.iterdir())]
    latest = latest_checkpoint(f"{bucket}/ckpt", storage_options=options) or ""
    return {"exit_code": code, "reports": found, "latest": latest, "job": str(job)}


SCENARIOS = {"storage": storage, "steps": steps, "plugin": plugin}


def main(root: Path, bucket: str, options: dict) -> None:
    sys.path.insert(0, str(REPO))
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        for name, scenario in SCENARIOS.items():
            try:
                result = {"ok": True, **scenario(root, cluster, bucket, options)}
            except Exception:
                result = {"ok": False, "error": traceback.format_exc()}
            finally:
                if ray.is_initialized():
                    ray.shutdown()
            print(MARK + json.dumps({"scenario": name, **result}), flush=True)
    finally:
        cluster.shutdown()


def outcome(root: Path, bucket: str, options: dict, timeout: float) -> dict[str, dict]:
    """Run the child; {scenario: its result}. Raises with the child's output when it printed none."""
    import subprocess

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(root), bucket, json.dumps(options)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            record = json.loads(line[len(MARK):])
            results[record.pop("scenario")] = record
    results["_output"] = {"returncode": proc.returncode, "tail": proc.stdout[-4000:] + proc.stderr[-4000:]}
    return results


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))

"""run_job: the entry point of `orchestrator train`, and its storage checks."""

from __future__ import annotations

import os

import pytest

from orchestrator.cluster.errors import ClusterSetupError
from orchestrator.cluster.job import check_shared_storage, local_num_cpus, run_job

from .conftest import make_config, with_changes

RECIPE = dict(hidden=(16,), optimizer="adam", learning_rate=3e-3, batch=32)


class RecordingReporter:
    def __init__(self):
        self.steps, self.evals, self.checkpoints = [], [], []

    def on_step(self, step, metrics):
        self.steps.append((step, dict(metrics)))

    def on_eval(self, step, metrics):
        self.evals.append((step, dict(metrics)))

    def on_checkpoint(self, step, seconds, nbytes):
        self.checkpoints.append((step, nbytes))


def test_run_job_trains_saves_and_reports(tmp_path, ray_session):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=20, save_every=10, eval_every=10, **RECIPE)
    reporter = RecordingReporter()
    result = run_job(config, reporter=reporter)
    assert result.steps_completed == 20 and not result.preempted
    assert [os.path.basename(p) for p in result.checkpoints] == ["model.ckpt-10", "model.ckpt-20"]
    assert result.last_checkpoint == result.checkpoints[-1]
    assert [s for s, _ in reporter.checkpoints] == [10, 20] and all(n > 0 for _, n in reporter.checkpoints)
    assert [s for s, _ in reporter.steps] == [1, 10, 20]
    assert {"loss", "accuracy"} <= set(reporter.steps[-1][1])
    assert [s for s, _ in reporter.evals] == [10, 20]
    assert 0.0 <= result.final_metrics["eval_accuracy"] <= 1.0

    again = run_job(with_changes(config, train={"steps": 25}), reporter=RecordingReporter())
    assert again.steps_completed == 25  # auto-resumed at 20: 5 more steps, one more checkpoint
    assert os.path.basename(again.last_checkpoint) == "model.ckpt-25"


def test_memory_checkpoint_dir_is_rejected_before_anything_starts(ray_session, memory_root):
    config = make_config(memory_root + "/ckpt")
    with pytest.raises(ClusterSetupError, match="memory:// is private to each process"):
        check_shared_storage(config)


def test_local_dir_on_a_single_node_is_accepted(ray_session, tmp_path):
    check_shared_storage(make_config(str(tmp_path / "ckpt")))


def test_local_ray_declares_enough_cpus(tmp_path):
    config = make_config(str(tmp_path))
    assert local_num_cpus(config) == 8
    big = with_changes(config, workers={"min": 4, "max": 12}, resources={"cpus_per_worker": 1.5})
    assert local_num_cpus(big) == 18
    assert local_num_cpus(with_changes(config, cluster={"num_cpus": 3})) == 3


def test_sharded_checkpoints_on_s3_and_resume(ray_session, s3_bucket, s3_options):
    from orchestrator.checkpoint.reader import CheckpointReader

    directory = s3_bucket + "/run/ckpt"
    base = make_config(directory, workers=2, steps=4, save_every=2, **RECIPE)
    config = with_changes(base, checkpoint={"storage_options": s3_options})
    first = run_job(config)
    assert first.last_checkpoint == directory + "/model.ckpt-4"
    reader = CheckpointReader(first.last_checkpoint, s3_options)
    reader.verify()
    assert reader.num_shards == 2 and int(reader.get_tensor("global_step")) == 4
    resumed = run_job(with_changes(config, train={"steps": 6}))
    assert resumed.steps_completed == 6 and resumed.last_checkpoint == directory + "/model.ckpt-6"

"""``init_from`` in the runtime (shared Ray session): the workers take the planned variables at
start-up, the job starts at step 0, a restart resumes the job's own checkpoint, and a warm-started
run stopped and resumed ends bit-identical to one that ran straight through."""

from __future__ import annotations

import numpy as np

from orchestrator.checkpoint import Saver
from orchestrator.engine.backend import get_backend
from orchestrator.engine.models import ModelSpec, build_model
from tests.cluster.conftest import assert_bit_identical, make_config, with_changes, worker_state

STEPS = 4


def _small_checkpoint(directory) -> dict[str, np.ndarray]:
    """A 64-16-10 MLP saved with our Saver (no structure record, as from a plain training script)."""
    small = build_model(ModelSpec(input_dim=64, hidden=(16,), num_classes=10), get_backend("cpu"), seed=11)
    Saver(small.variables).save(str(directory / "model.ckpt"), global_step=500)
    return {v.name: v.numpy() for v in small.variables}


def _config(tmp_path, name: str, source) -> object:
    config = make_config(str(tmp_path / name), steps=STEPS, save_every=2, hidden=(16, 16), optimizer="sgd")
    return with_changes(config, init_from={"checkpoint": str(source), "variables": ["dense/*", "dense_2/*"],
                                           "rename": {"dense_1/kernel": "dense_2/kernel",
                                                      "dense_1/bias": "dense_2/bias"}})


def test_warm_start_then_resume_is_bit_identical_to_a_straight_run(tmp_path, run_coordinator):
    small = _small_checkpoint(tmp_path / "small")
    straight_config = _config(tmp_path, "straight", tmp_path / "small")
    straight = run_coordinator(straight_config)
    assert straight.restored_from is None and straight.global_step == 0
    started = worker_state(straight)
    np.testing.assert_array_equal(started["dense/kernel"], small["dense/kernel"])
    np.testing.assert_array_equal(started["dense_2/kernel"], small["dense_1/kernel"])
    fresh = build_model(ModelSpec(input_dim=64, hidden=(16, 16), num_classes=10), get_backend("cpu"), seed=0)
    initial = {v.name: v.numpy() for v in fresh.variables}
    np.testing.assert_array_equal(started["dense_1/kernel"], initial["dense_1/kernel"])  # not selected: as initialised
    straight.run()
    expected = worker_state(straight)

    config = _config(tmp_path, "stopped", tmp_path / "small")
    first = run_coordinator(with_changes(config, train={"steps": 2}))
    assert first.run().last_checkpoint.endswith("model.ckpt-2")
    first.shutdown()
    resumed = run_coordinator(config)  # the job's own checkpoint exists: it resumes, init_from is not applied again
    assert resumed.restored_from.endswith("model.ckpt-2") and resumed.global_step == 2
    resumed.run()
    assert_bit_identical(worker_state(resumed), expected)

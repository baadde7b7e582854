"""M workers train one model: same math as one process, same accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.cluster import recipe
from orchestrator.cluster.coordinator import aggregate_metrics
from orchestrator.engine.backend import get_backend
from orchestrator.engine.models import build_model
from orchestrator.engine.step import Trainer

from .conftest import make_config, worker_state

ACCURACY_TARGET = 0.97
# A digits MLP that reaches the target in a few hundred steps: without dropout, seed 3, one process
# gets 349 of the 359 test digits right (97.2%) after 400 steps; M workers do the same math.
FAST_RECIPE = dict(hidden=(64,), optimizer="adam", learning_rate=1e-2, batch=128, keep=(1.0, 1.0), seed=3)


def single_process_trainer(config) -> Trainer:
    """The engine's one-process reference for ``config``."""
    dataset = recipe.load_data(config)
    model = build_model(recipe.model_spec(config, dataset), get_backend("cpu"), config.seed)
    sampler = recipe.make_sampler(config, dataset, config.seed)
    return Trainer(model, recipe.make_optimizer(config), sampler, dataset, config.seed)


def trainer_state(trainer: Trainer) -> dict[str, np.ndarray]:
    return {v.name: v.numpy() for v in trainer.state_variables() if v.name != "global_step"}


def test_two_workers_match_single_process_after_k_steps(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "ckpt"), workers=2, steps=12, hidden=(48, 32), optimizer="rmsprop",
                         learning_rate=1e-3, batch=50, keep=(0.8, 0.5))
    coordinator = run_coordinator(config)
    coordinator.run()
    trainer = single_process_trainer(config)
    for _ in range(config.train.steps):
        trainer.train_step()
    distributed, reference = worker_state(coordinator), trainer_state(trainer)
    assert sorted(distributed) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_allclose(distributed[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
    # and training really moved the weights (dropout on, odd batch split 25/25)
    initial = build_model(trainer.model.spec, get_backend("cpu"), config.seed)
    assert not np.allclose(initial.variables[0].numpy(), reference["dense/kernel"])


def test_ownership_splits_variables_and_slots_across_workers(tmp_path, run_coordinator):
    coordinator = run_coordinator(make_config(str(tmp_path / "ckpt"), workers=3, hidden=(16, 16), steps=1))
    owned = [set(info["owned"]) for info in coordinator.worker_info]
    assert all(owned), "every worker owns something"
    assert set.union(*owned) == {f"{layer}/{kind}" for layer in ("dense", "dense_1", "dense_2")
                                 for kind in ("kernel", "bias")}
    assert sum(len(o) for o in owned) == 6


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_m_workers_reach_single_process_accuracy(tmp_path, run_coordinator, workers):
    config = make_config(str(tmp_path / "ckpt"), workers=workers, steps=400, eval_every=0, **FAST_RECIPE)
    result = run_coordinator(config).run()
    assert result.steps_completed == 400
    assert result.final_metrics["eval_accuracy"] >= ACCURACY_TARGET


def test_single_process_reaches_the_same_target(tmp_path):
    config = make_config(str(tmp_path / "ckpt"), steps=400, **FAST_RECIPE)
    trainer = single_process_trainer(config)
    for _ in range(config.train.steps):
        trainer.train_step()
    assert trainer.evaluate()[1] >= ACCURACY_TARGET


def test_metrics_are_aggregated_over_the_global_batch():
    per_rank = [{"loss_sum": 3.0, "num_correct": 2, "examples": 3},
                {"loss_sum": 1.0, "num_correct": 3, "examples": 3}]
    metrics = aggregate_metrics(per_rank, seconds=0.5)
    assert metrics["loss"] == pytest.approx(4.0 / 6)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["examples_per_sec"] == pytest.approx(12.0)

"""Single-process training: the reference MLP learns digits, and runs are reproducible to the bit.

Recipe (kept to seconds on 2 cores): the reference architecture's dropout (keep 0.8 input,
0.5 hidden) with hidden (256, 256) instead of (625, 625), Adam lr 1e-3, global batch 128,
800 steps (~70 epochs of the 1438 training images).
"""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.checkpoint.errors import CheckpointNotFoundError
from orchestrator.engine.backend import numpy_backend
from orchestrator.engine.data import Sampler, load_dataset
from orchestrator.engine.models import ModelSpec, build_model
from orchestrator.engine.optimizers import make_optimizer
from orchestrator.engine.step import GLOBAL_STEP, Trainer

SPEC = ModelSpec(kind="mlp", input_dim=64, hidden=(256, 256), num_classes=10, activation="relu",
                 keep_prob_input=0.8, keep_prob_hidden=0.5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _trainer(digits, seed=0, optimizer="adam", spec=SPEC, batch=128):
    model = build_model(spec, numpy_backend(), seed)
    return Trainer(model, make_optimizer(optimizer, 1e-3), Sampler(len(digits.train_y), batch, seed), digits, seed)


def _run(trainer, steps):
    return [trainer.train_step() for _ in range(steps)]


def _state(trainer):
    return {v.name: v.numpy().copy() for v in trainer.state_variables()}


def test_reference_mlp_reaches_97_percent_on_digits(digits):
    trainer = _trainer(digits)
    initial_loss, initial_accuracy = trainer.evaluate()
    metrics = _run(trainer, 800)
    loss, accuracy = trainer.evaluate()
    assert metrics[-1].step == 800 and trainer.step == 800
    assert accuracy >= 0.97, f"test accuracy {accuracy:.4f} after 800 steps"
    assert loss < initial_loss / 10 and initial_accuracy < 0.5


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_the_same_run_twice_gives_bit_identical_state(digits, optimizer):
    first, second = _trainer(digits, optimizer=optimizer), _trainer(digits, optimizer=optimizer)
    losses_first = [m.loss for m in _run(first, 60)]
    losses_second = [m.loss for m in _run(second, 60)]
    assert losses_first == losses_second
    a, b = _state(first), _state(second)
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_different_seeds_give_different_runs(digits):
    a, b = _trainer(digits, seed=0), _trainer(digits, seed=1)
    _run(a, 5)
    _run(b, 5)
    assert not np.array_equal(a.model.variables[0].numpy(), b.model.variables[0].numpy())


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "momentum"])
def test_resume_from_saved_state_is_bit_identical_to_uninterrupted(digits, optimizer):
    uninterrupted = _trainer(digits, optimizer=optimizer, batch=100)
    _run(uninterrupted, 37)
    saved, position = _state(uninterrupted), uninterrupted.sampler.state()
    _run(uninterrupted, 23)

    resumed = _trainer(digits, seed=0, optimizer=optimizer, batch=100)   # fresh process state
    resumed.restore(saved, position)
    assert resumed.step == 37
    _run(resumed, 23)
    final, expected = _state(resumed), _state(uninterrupted)
    assert final[GLOBAL_STEP] == 60
    for name in expected:
        assert final[name].tobytes() == expected[name].tobytes(), name


def test_state_variables_are_params_slots_and_global_step(digits):
    trainer = _trainer(digits, optimizer="rmsprop")
    names = [v.name for v in trainer.state_variables()]
    assert names[:6] == trainer.model.param_names
    assert names[6:8] == ["dense/kernel/RMSProp", "dense/kernel/RMSProp_1"]
    assert names[-1] == GLOBAL_STEP and len(names) == 6 + 12 + 1
    with pytest.raises(CheckpointNotFoundError, match="dense_2/bias/RMSProp_1"):
        trainer.restore({n: None for n in names if n != "dense_2/bias/RMSProp_1"}, {"epoch": 0, "index": 0})


def test_apply_gradients_updates_only_the_owned_subset(digits):
    from orchestrator.engine.step import apply_gradients

    trainer = _trainer(digits, optimizer="rmsprop")
    before = _state(trainer)
    x, y = digits.train_x[:32], digits.train_y[:32]
    _, _, grads = trainer.model.loss_and_grads(trainer.model.params(), x, y, step=0, example_offset=0,
                                               global_batch_size=32, seed=0)
    owned = [v for v in trainer.model.variables if v.name.startswith("dense_1/")]
    apply_gradients(trainer.optimizer, owned, grads, trainer.slots, step=0)
    after = _state(trainer)
    changed = sorted(name for name in before if not np.array_equal(before[name], after[name]))
    assert changed == ["dense_1/bias", "dense_1/bias/RMSProp", "dense_1/bias/RMSProp_1",
                       "dense_1/kernel", "dense_1/kernel/RMSProp", "dense_1/kernel/RMSProp_1"]

"""Splitting a global batch across M workers gives the single-process gradients (dropout on)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.engine.data import split_batch
from orchestrator.engine.models import ModelSpec, build_model

SPEC = ModelSpec(kind="mlp", input_dim=20, hidden=(16, 12), num_classes=5, activation="relu",
                 keep_prob_input=0.8, keep_prob_hidden=0.5)


def _batch(size=30):
    data = np.random.default_rng(7)
    return data.random((size, SPEC.input_dim), dtype=np.float32), data.integers(0, 5, size)


@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
def test_summed_worker_gradients_equal_full_batch_gradients(world_size, backend):
    model = build_model(SPEC, backend, seed=3)
    params = model.params()
    x, y = _batch()
    kwargs = dict(step=11, global_batch_size=len(y), seed=99)
    full_loss, full_correct, full = model.loss_and_grads(params, x, y, example_offset=0, **kwargs)

    total = {name: np.zeros(g.shape, np.float32) for name, g in full.items()}
    loss_sum, correct = 0.0, 0
    for rank in range(world_size):                      # rank order, as the runtime sums them
        local, offset = split_batch(np.arange(len(y)), rank, world_size)
        part_loss, part_correct, grads = model.loss_and_grads(params, x[local], y[local],
                                                              example_offset=offset, **kwargs)
        loss_sum += part_loss
        correct += part_correct
        for name, g in grads.items():
            total[name] += backend.to_host(g)
    assert loss_sum == pytest.approx(full_loss, rel=1e-5)
    assert correct == full_correct
    for name in model.param_names:
        np.testing.assert_allclose(total[name], backend.to_host(full[name]), rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_worker_slice_without_global_offset_draws_other_masks(backend):
    """The offset matters: a slice evaluated as if it started the batch gets different dropout."""
    model = build_model(SPEC, backend, seed=3)
    x, y = _batch()
    kwargs = dict(step=11, global_batch_size=len(y), seed=99)
    _, _, right = model.loss_and_grads(model.params(), x[15:], y[15:], example_offset=15, **kwargs)
    _, _, wrong = model.loss_and_grads(model.params(), x[15:], y[15:], example_offset=0, **kwargs)
    assert not np.allclose(backend.to_host(right["dense/kernel"]), backend.to_host(wrong["dense/kernel"]))


def test_fresh_gradients_are_not_overwritten_by_the_next_call():
    from orchestrator.engine.backend import numpy_backend

    model = build_model(SPEC, numpy_backend(), seed=3)
    x, y = _batch()
    first = model.loss_and_grads(model.params(), x, y, step=0, example_offset=0, global_batch_size=30, seed=1)[2]
    kept = {k: v.copy() for k, v in first.items()}
    model.loss_and_grads(model.params(), x[::-1], y[::-1], step=1, example_offset=0, global_batch_size=30, seed=1)
    for name in kept:
        np.testing.assert_array_equal(first[name], kept[name])

"""Every layer's backward pass against finite differences (float64, dropout on), and split-batch invariance.

Each case is a small network around the layer under test; a parametrized layer in front of
a parameter-free one (pooling, activation, attention's input) checks that layer's input
gradient through the front layer's parameter gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.engine.data import split_batch
from orchestrator.engine.network import SequentialSpec
from orchestrator.engine.transformer import TransformerSpec

EPS = 1e-6
STEP = dict(step=3, seed=42)

CONV = {"type": "conv2d", "filters": 3, "kernel_size": 3, "padding": "same", "activation": "relu"}
CASES = {
    "dense-relu-dropout": ((5,), 4, [{"type": "dense", "units": 6, "activation": "relu"},
                                     {"type": "dropout", "rate": 0.3}, {"type": "dense"}]),
    "dense-gelu-tanh-linear": ((5,), 3, [{"type": "dense", "units": 6, "activation": "gelu"},
                                         {"type": "dense", "units": 4, "activation": "tanh"},
                                         {"type": "dense", "units": 4, "use_bias": False},
                                         {"type": "dense"}]),
    "activation": ((5,), 3, [{"type": "dense", "units": 6}, {"type": "activation", "activation": "tanh"},
                             {"type": "activation", "activation": "gelu"}, {"type": "dense"}]),
    "conv2d-same-valid-strided": ((6, 6, 2), 3, [
        CONV, {"type": "conv2d", "filters": 4, "kernel_size": [2, 3], "strides": 2, "activation": "tanh"},
        {"type": "dropout", "rate": 0.25}, {"type": "flatten"}, {"type": "dense"}]),
    "max-pooling": ((6, 5, 2), 3, [CONV, {"type": "max_pooling2d", "pool_size": 3, "strides": 2, "padding": "same"},
                                   {"type": "max_pooling2d", "pool_size": [2, 1]}, {"type": "flatten"},
                                   {"type": "dense"}]),
    "average-pooling": ((6, 5, 2), 3, [CONV, {"type": "average_pooling2d", "pool_size": 3, "strides": 2,
                                              "padding": "same"}, {"type": "average_pooling2d"},
                                       {"type": "flatten"}, {"type": "dense"}]),
    "reshape-layernorm": ((12,), 3, [{"type": "dense", "units": 8}, {"type": "reshape", "target_shape": [2, 4]},
                                     {"type": "layer_normalization", "epsilon": 1e-5}, {"type": "flatten"},
                                     {"type": "dense"}]),
    "attention-causal-dropout": ((6,), 7, [
        {"type": "embedding", "input_dim": 7, "output_dim": 8}, {"type": "position_embedding", "sequence_length": 6},
        {"type": "residual", "layers": [{"type": "layer_normalization"},
                                        {"type": "multi_head_attention", "num_heads": 2, "causal": True,
                                         "dropout": 0.2}]},
        {"type": "dense"}]),
    "attention-no-bias-wide-keys": ((4, 5), 3, [
        {"type": "dense", "units": 6},
        {"type": "multi_head_attention", "num_heads": 3, "key_dim": 4, "use_bias": False},
        {"type": "flatten"}, {"type": "dense"}]),
    "cnn": ((8, 8, 1), 10, [CONV, {"type": "max_pooling2d"},
                            {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same",
                             "activation": "relu"},
                            {"type": "max_pooling2d"}, {"type": "flatten"},
                            {"type": "dense", "units": 8, "activation": "relu"}, {"type": "dropout", "rate": 0.5},
                            {"type": "dense"}]),
}
TRANSFORMER = TransformerSpec(vocab=7, context=5, d_model=8, heads=2, layers=2, ff_dim=12, dropout=0.2)


def _spec(case):
    if case == "transformer":
        return TRANSFORMER
    input_shape, classes, layers = CASES[case]
    return SequentialSpec(input_shape=input_shape, num_classes=classes, layers=layers)


def _problem(case, backend, batch=5):
    spec = _spec(case)
    data = np.random.default_rng(0)
    model = spec.build(backend, seed=1)
    if model.integer_input:
        x = data.integers(0, model.layers[0].config["input_dim"], (batch, *spec.input_shape))
    else:
        x = data.normal(size=(batch, *spec.input_shape))
    y = data.integers(0, spec.num_classes, (batch, *model.output_shape[:-1]))
    params = {v.name: backend.xp.asarray(v.numpy(), dtype=np.float64) for v in model.variables}
    for name, value in params.items():        # move zero biases / unit gammas off their start
        params[name] = value + backend.asarray(data.normal(0, 0.1, value.shape))
    return model, params, backend.asarray(x), backend.asarray(y)


def _entries(shape, data, limit=10):
    """Every index of a small tensor, else ``limit`` random ones."""
    indices = list(np.ndindex(shape))
    if len(indices) <= limit:
        return indices
    return [indices[i] for i in data.choice(len(indices), limit, replace=False)]


ALL = [*CASES, "transformer"]


@pytest.mark.parametrize("case", ALL)
def test_gradients_match_finite_differences(case, backend):
    model, params, x, y = _problem(case, backend)
    kwargs = dict(example_offset=4, global_batch_size=9, **STEP)

    def loss(p):
        return model.loss_and_grads(p, x, y, **kwargs)[0] / 9

    grads = model.loss_and_grads(params, x, y, **kwargs)[2]
    assert list(grads) == model.param_names
    data = np.random.default_rng(5)
    for name in model.param_names:
        analytic, base = backend.to_host(grads[name]), backend.to_host(params[name])
        assert analytic.shape == base.shape and analytic.dtype == np.float64, name
        for index in _entries(base.shape, data):
            values = []
            for sign in (1, -1):
                shifted = base.copy()
                shifted[index] += sign * EPS
                values.append(loss({**params, name: backend.asarray(shifted)}))
            numeric = (values[0] - values[1]) / (2 * EPS)
            assert analytic[index] == pytest.approx(numeric, rel=1e-5, abs=1e-8), f"{name}{list(index)}"


@pytest.mark.parametrize("case", ["dense-relu-dropout", "conv2d-same-valid-strided", "cnn",
                                  "attention-causal-dropout", "transformer"])
def test_dropout_is_active_in_the_checked_loss(case, backend):
    """Guard for the check above: with dropout the loss depends on the step (new masks each step)."""
    model, params, x, y = _problem(case, backend)
    losses = {model.loss_and_grads(params, x, y, step=s, example_offset=0, global_batch_size=5, seed=1)[0]
              for s in range(3)}
    plain = model.loss_and_grads(params, x, y, step=0, example_offset=0, global_batch_size=5, seed=1,
                                 train=False)[0]
    assert len(losses) == 3 and plain not in losses


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", ALL)
def test_summed_slice_gradients_equal_full_batch(case, world_size, backend):
    model, params, x, y = _problem(case, backend, batch=7)
    kwargs = dict(global_batch_size=7, **STEP)
    full_loss, full_correct, full = model.loss_and_grads(params, x, y, example_offset=0, **kwargs)
    total = {name: np.zeros(g.shape) for name, g in full.items()}
    loss_sum, correct = 0.0, 0
    for rank in range(world_size):
        local, offset = split_batch(np.arange(7), rank, world_size)
        part_loss, part_correct, grads = model.loss_and_grads(params, x[local], y[local],
                                                              example_offset=offset, **kwargs)
        loss_sum, correct = loss_sum + part_loss, correct + part_correct
        for name, g in grads.items():
            total[name] += backend.to_host(g)
    assert loss_sum == pytest.approx(full_loss, rel=1e-12)
    assert correct == pytest.approx(full_correct)
    for name in model.param_names:
        np.testing.assert_allclose(total[name], backend.to_host(full[name]), rtol=1e-10, atol=1e-13,
                                   err_msg=name)


def test_causal_dropout_mask_blocks_cover_every_visible_key():
    from orchestrator.engine import kernels_numpy
    from orchestrator.engine.layers.attention import causal_blocks

    heads, queries, keys = 3, 12, 20                                    # keys > queries: a prefix visible
    blocks = causal_blocks(heads, queries, keys)
    full = kernels_numpy.dropout_mask(5, 2, 1, 7, (4, heads * queries * keys), 0.5, np.float32)
    part = kernels_numpy.dropout_mask(5, 2, 1, 7, (4, heads * queries * keys), 0.5, np.float32, blocks)
    visible = np.tril(np.ones((queries, keys), bool), k=keys - queries)
    visible = np.broadcast_to(visible, (heads, queries, keys)).reshape(-1)
    np.testing.assert_array_equal(part[:, visible], full[:, visible])
    drawn = np.zeros(heads * queries * keys // 8, bool)
    drawn[blocks] = True
    assert (part[:, ~np.repeat(drawn, 8)] == 0).all() and not drawn.all()

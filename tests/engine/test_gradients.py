"""Finite-difference checks (float64) of every layer, activation and the loss, with dropout on."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.engine.models import ModelSpec, build_model

EPS = 1e-6


def _float64_params(model, backend):
    return {v.name: backend.xp.asarray(v.numpy(), dtype=np.float64) for v in model.variables}


def _problem(spec, backend, seed=0, batch=7):
    data = np.random.default_rng(seed)
    x = backend.asarray(data.random((batch, spec.input_dim)))
    y = backend.asarray(data.integers(0, spec.num_classes, batch))
    model = build_model(spec, backend, seed)
    params = _float64_params(model, backend)
    for name, value in params.items():         # non-zero biases so every bias path is exercised
        if name.endswith("/bias"):
            params[name] = value + backend.asarray(data.normal(0, 0.1, value.shape))
    return model, params, x, y


def _numeric_grad(loss, params, name, backend):
    """Central differences of ``loss(params)`` for every element of ``params[name]``."""
    base = backend.to_host(params[name])
    grad = np.zeros_like(base)
    for index in np.ndindex(base.shape):
        values = []
        for sign in (1, -1):
            shifted = base.copy()
            shifted[index] += sign * EPS
            values.append(loss({**params, name: backend.asarray(shifted)}))
        grad[index] = (values[0] - values[1]) / (2 * EPS)
    return grad


SPECS = [
    ModelSpec(kind="mlp", input_dim=5, hidden=(4, 3), num_classes=3, activation="relu",
              keep_prob_input=0.8, keep_prob_hidden=0.5),
    ModelSpec(kind="mlp", input_dim=5, hidden=(4, 3), num_classes=3, activation="gelu",
              keep_prob_input=0.8, keep_prob_hidden=0.5),
    ModelSpec(kind="mlp", input_dim=4, hidden=(6,), num_classes=4, activation="relu",
              keep_prob_input=1.0, keep_prob_hidden=1.0),
    ModelSpec(kind="softmax", input_dim=6, num_classes=4, keep_prob_input=0.8),
]


@pytest.mark.parametrize("spec", SPECS, ids=["relu-dropout", "gelu-dropout", "relu-no-dropout", "softmax"])
def test_every_parameter_gradient_matches_finite_differences(spec, backend):
    model, params, x, y = _problem(spec, backend)
    kwargs = dict(step=3, example_offset=5, global_batch_size=11, seed=42)

    def loss(p):
        return model.loss_and_grads(p, x, y, **kwargs)[0] / 11

    _, _, grads = model.loss_and_grads(params, x, y, **kwargs)
    assert list(grads) == model.param_names
    for name in model.param_names:
        numeric = _numeric_grad(loss, params, name, backend)
        np.testing.assert_allclose(backend.to_host(grads[name]), numeric, rtol=1e-5, atol=1e-8,
                                   err_msg=f"gradient of {name}")


def test_dropout_is_active_in_the_checked_loss(backend):
    """Guard for the test above: with dropout, the loss depends on the step (masks change)."""
    model, params, x, y = _problem(SPECS[0], backend)
    losses = {model.loss_and_grads(params, x, y, step=s, example_offset=0, global_batch_size=7, seed=1)[0]
              for s in range(4)}
    no_dropout = model.loss_and_grads(params, x, y, step=0, example_offset=0, global_batch_size=7,
                                      seed=1, train=False)[0]
    assert len(losses) == 4 and no_dropout not in losses


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_bias_activation_dropout_kernel_gradient(activation, backend):
    ops, xp = backend.ops, backend.xp
    data = np.random.default_rng(1)
    z0, bias, weight = data.normal(size=(6, 5)), data.normal(size=5), data.normal(size=(6, 5))
    mask = backend.asarray(np.where(data.random((6, 5)) < 0.5, 2.0, 0.0))

    def objective(z):                          # sum(weight * act(z + bias) * mask)
        a = ops.bias_act_dropout(backend.asarray(z.copy()), backend.asarray(bias), activation, mask)
        return float(xp.sum(a * backend.asarray(weight)))

    z = backend.asarray(z0.copy())
    ops.bias_act_dropout(z, backend.asarray(bias), activation, mask)     # z <- z0 + bias
    analytic = backend.to_host(ops.bias_act_dropout_grad(backend.asarray(weight.copy()), z, activation, mask))
    numeric = np.zeros_like(z0)
    for index in np.ndindex(z0.shape):
        plus, minus = z0.copy(), z0.copy()
        plus[index] += EPS
        minus[index] -= EPS
        numeric[index] = (objective(plus) - objective(minus)) / (2 * EPS)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_softmax_cross_entropy_value_and_gradient(backend):
    ops = backend.ops
    data = np.random.default_rng(2)
    logits0, labels = data.normal(size=(5, 4)) * 3, data.integers(0, 4, 5)
    shifted = logits0 - logits0.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_probs[np.arange(5), labels].sum()

    loss, correct, grad = ops.softmax_cross_entropy(backend.asarray(logits0.copy()), backend.asarray(labels), 0.25)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert correct == int((logits0.argmax(axis=1) == labels).sum())

    def objective(logits):
        return ops.softmax_cross_entropy(backend.asarray(logits.copy()), backend.asarray(labels), 0.0)[0] * 0.25

    numeric = np.zeros_like(logits0)
    for index in np.ndindex(logits0.shape):
        plus, minus = logits0.copy(), logits0.copy()
        plus[index] += EPS
        minus[index] -= EPS
        numeric[index] = (objective(plus) - objective(minus)) / (2 * EPS)
    np.testing.assert_allclose(backend.to_host(grad), numeric, rtol=1e-6, atol=1e-9)


def test_softmax_cross_entropy_is_stable_for_huge_logits(backend):
    logits = backend.asarray(np.array([[1000.0, 0.0, -1000.0], [0.0, 800.0, 0.0]]))
    loss, correct, grad = backend.ops.softmax_cross_entropy(logits, backend.asarray(np.array([0, 0])), 1.0)
    assert loss == pytest.approx(800.0) and correct == 1
    assert np.isfinite(backend.to_host(grad)).all()

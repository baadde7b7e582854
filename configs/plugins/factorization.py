"""A factorization machine for regression (Rendle, ICDM 2010), written as an orchestrator plug-in.

    prediction(x) = bias + x . linear + 1/2 * sum_f [ (x V)_f^2 - (x^2)(V^2)_f ]

``V`` ([features, factors]) models every pairwise feature interaction with a low-rank
factorization. The loss is the squared error; ``evaluate`` reports the mean squared
error as the loss, no accuracy (regression), and the mean absolute error as an extra
metric. Input dropout (``keep_prob`` < 1) draws its masks with ``orchestrator.plugin.uniform``
from (seed, step, global example index), so 1 or M workers and any resume draw the same
masks. Run it with ``orchestrator train configs/plugins/factorization.yaml``; check it with
``orchestrator check-model configs/plugins/factorization.yaml``.

``make_data`` is the data plug-in of the example: features in [0, 1) and targets from a
random factorization machine plus noise (a function of ``seed`` only).
"""

from __future__ import annotations

import numpy as np

from orchestrator.plugin import PluginError, Variable, uniform

NAMES = ("fm/bias", "fm/linear", "fm/factors")


def build(*, input_shape, num_classes, backend, seed, factors=8, keep_prob=1.0, init_scale=0.01):
    """The model factory: ``model: {factory: factorization:build, args: {factors: 8}}``."""
    if num_classes is not None:
        raise PluginError(f"a factorization machine regresses float targets; got {num_classes} classes")
    if len(input_shape) != 1:
        raise PluginError(f"features must be vectors [N, D], got [N, {', '.join(map(str, input_shape))}]")
    if not 0.0 < keep_prob <= 1.0:
        raise PluginError(f"keep_prob must be in (0, 1], got {keep_prob}")
    generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0xF4C7])))
    dim = int(input_shape[0])
    values = [np.zeros(1, np.float32), np.zeros(dim, np.float32),
              (generator.standard_normal((dim, factors)) * init_scale).astype(np.float32)]
    variables = [Variable(name, backend.asarray(value)) for name, value in zip(NAMES, values)]
    return FactorizationMachine(variables, backend, float(keep_prob))


class FactorizationMachine:
    """The model: ``variables``, ``loss_and_grads`` and ``evaluate`` (the plug-in protocol)."""

    def __init__(self, variables, backend, keep_prob):
        self.variables = variables
        self.backend = backend
        self.keep_prob = keep_prob

    def loss_and_grads(self, params, x, y, *, step, example_offset, global_batch_size, seed, train=True):
        """(squared error summed over the slice, None, grads summed / global_batch_size)."""
        xp = self.backend.xp
        bias, linear, factors = (params[name] for name in NAMES)
        x = xp.asarray(x, dtype=linear.dtype)
        if train and self.keep_prob < 1.0:
            keep = uniform(seed, step, example_offset, x.shape) < self.keep_prob
            x = x * self.backend.asarray(keep.astype(x.dtype) / x.dtype.type(self.keep_prob))
        xv = x @ factors                                                     # [B, F]
        x2 = x * x
        prediction = bias[0] + x @ linear + 0.5 * (xv * xv - x2 @ (factors * factors)).sum(axis=1)
        error = prediction - xp.asarray(y, dtype=linear.dtype)               # [B]
        scale = error * (2.0 / global_batch_size)                            # d loss_sum/G / d prediction
        grads = {
            "fm/bias": scale.sum(keepdims=True).astype(linear.dtype),
            "fm/linear": x.T @ scale,
            "fm/factors": x.T @ (scale[:, None] * xv) - factors * (x2.T @ scale)[:, None],
        }
        return float((error * error).sum()), None, grads

    def evaluate(self, params, x, y):
        """(mean squared error, no accuracy, {"mae": mean absolute error})."""
        xp = self.backend.xp
        bias, linear, factors = (params[name] for name in NAMES)
        x = xp.asarray(x, dtype=linear.dtype)
        xv = x @ factors
        prediction = bias[0] + x @ linear + 0.5 * (xv * xv - (x * x) @ (factors * factors)).sum(axis=1)
        error = prediction - xp.asarray(y, dtype=linear.dtype)
        return float((error * error).mean()), None, {"mae": float(xp.abs(error).mean())}


def make_data(*, seed, num_examples=4096, num_eval=512, num_features=16, factors=4, noise=0.05):
    """The data factory: ``data: {factory: factorization:make_data, args: {...}}``."""
    generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0xDA7A])))
    x = generator.random((num_examples + num_eval, num_features), dtype=np.float32)
    linear = generator.standard_normal(num_features).astype(np.float32)
    v = (generator.standard_normal((num_features, factors)) / np.sqrt(factors)).astype(np.float32)
    xv = x @ v
    y = x @ linear + 0.5 * (xv * xv - (x * x) @ (v * v)).sum(axis=1)
    y = (y + noise * generator.standard_normal(len(y))).astype(np.float32)
    return x[:num_examples], y[:num_examples], x[num_examples:], y[num_examples:]

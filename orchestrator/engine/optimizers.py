"""Optimizers with TF1 update rules and TF1 slot names, applied one variable at a time.

Per-variable so a worker updates only the variables it owns:

    optimizer = make_optimizer("rmsprop", 0.001, decay=0.9)
    slots = optimizer.create_slots(var)        # [Variable("dense/kernel/RMSProp"), ...]
    optimizer.apply(var, grad, slots, step)    # in place; one fused kernel on cupy

``step`` is the number of updates applied before this one (the ``global_step``
value before it is incremented). Update rules (TF ``training_ops``):

- sgd:      var -= lr * g
- momentum: accum = momentum * accum + g; var -= lr * accum       (slot "Momentum", zeros)
- rmsprop:  ms += (g^2 - ms) * (1 - decay); mom = momentum * mom + lr * g / sqrt(ms + eps);
            var -= mom                   (slots "RMSProp" = ms, initialized to ONES; "RMSProp_1" = mom)
- adam:     lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t) with t = step + 1;
            m += (g - m)(1 - beta1); v += (g^2 - v)(1 - beta2); var -= lr_t * m / (sqrt(v) + eps)
            (slots "Adam" = m, "Adam_1" = v)

Adam's ``beta1_power``/``beta2_power`` are not stored: they are recomputed from
``step`` exactly as TF1 accumulates them (a variable of the parameter's dtype,
multiplied by beta once per step; lr_t and 1 - beta also in that dtype), and
``step`` is the checkpointed ``global_step``, so a resumed run is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator import rules
from orchestrator.checkpoint.variables import Variable
from orchestrator.errors import BadInputError, InvalidArgumentError

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
HYPER_DEFAULTS = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "rmsprop": {"decay": 0.9, "momentum": 0.0, "epsilon": 1e-10},
    "adam": {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
}
SLOTS = {
    "sgd": (),
    "momentum": (("Momentum", 0.0),),
    "rmsprop": (("RMSProp", 1.0), ("RMSProp_1", 0.0)),
    "adam": (("Adam", 0.0), ("Adam_1", 0.0)),
}
# Hyperparameter names the job config carries for every optimizer; the ones a rule does not use are ignored.
SHARED_HYPER = ("momentum", "decay", "beta1", "beta2", "epsilon")


class OptimizerConfigError(BadInputError, ValueError):
    """Unknown optimizer name or hyperparameter, or a value out of range (named in the message)."""


@dataclass(frozen=True)
class Optimizer:
    """One update rule with its hyperparameters (``hyper`` holds only what the rule uses)."""

    name: str
    learning_rate: float
    hyper: dict[str, float] = field(default_factory=dict)

    def slot_names(self, var_name: str) -> list[str]:
        return [f"{var_name}/{suffix}" for suffix, _ in SLOTS[self.name]]

    def create_slots(self, var: Variable) -> list[Variable]:
        """Slot Variables for ``var`` (same shape, dtype and device), non-trainable."""
        slots = []
        for suffix, initial in SLOTS[self.name]:
            value = var.value.copy()
            value.fill(initial)
            slots.append(Variable(f"{var.name}/{suffix}", value, trainable=False))
        return slots

    def apply(self, var: Variable, grad: Any, slots: list[Variable], step: int) -> None:
        """Update ``var`` (and its slots) in place from ``grad`` for update number ``step``."""
        if tuple(grad.shape) != var.shape:
            raise InvalidArgumentError(
                f"gradient for {var.name} has shape {tuple(grad.shape)}, variable has {var.shape}")
        expected = self.slot_names(var.name)
        if [s.name for s in slots] != expected:
            raise InvalidArgumentError(f"slots for {var.name} must be {expected}, got {[s.name for s in slots]}")
        ops = _ops_for(var.value)
        rule = getattr(self, f"_apply_{self.name}")
        rule(ops, var.value, grad, [s.value for s in slots], step)

    def _apply_sgd(self, ops, var, grad, slots, step) -> None:
        ops.sgd_update(var, grad, self.learning_rate)

    def _apply_momentum(self, ops, var, grad, slots, step) -> None:
        ops.momentum_update(var, slots[0], grad, self.learning_rate, self.hyper["momentum"])

    def _apply_rmsprop(self, ops, var, grad, slots, step) -> None:
        h = self.hyper
        ops.rmsprop_update(var, slots[0], slots[1], grad, self.learning_rate,
                           h["decay"], h["momentum"], h["epsilon"])

    def _apply_adam(self, ops, var, grad, slots, step) -> None:
        h = self.hyper
        lr_t = adam_rate(self.learning_rate, h, step, var.dtype)
        ops.adam_update(var, slots[0], slots[1], grad, lr_t, h["beta1"], h["beta2"], h["epsilon"])


def adam_rate(learning_rate: float, hyper: dict[str, float], step: int, dtype: Any = np.float64) -> Any:
    """TF1 Adam's bias-corrected rate for update number ``step`` (t = step + 1), in ``dtype``."""
    t = np.dtype(dtype).type
    beta1_power = beta_power(hyper["beta1"], step + 1, dtype)
    beta2_power = beta_power(hyper["beta2"], step + 1, dtype)
    return t(learning_rate) * np.sqrt(t(1) - beta2_power) / (t(1) - beta1_power)


_POWER_CACHE: dict[tuple[float, str], tuple[int, Any]] = {}


def beta_power(beta: float, exponent: int, dtype: Any) -> Any:
    """beta ** exponent as TF1 computes it: ``exponent - 1`` successive multiplies in ``dtype``.

    Steps arrive in order, so the last result per (beta, dtype) is cached and extended.
    """
    if exponent < 1:
        raise InvalidArgumentError(f"exponent must be >= 1, got {exponent}")
    t = np.dtype(dtype).type
    key = (float(beta), np.dtype(dtype).str)
    done, value = _POWER_CACHE.get(key, (1, t(beta)))
    if done > exponent:
        done, value = 1, t(beta)
    factor = t(beta)
    for _ in range(exponent - done):
        value = value * factor
    _POWER_CACHE[key] = (exponent, value)
    return value


def make_optimizer(name: str, learning_rate: float, **hyper: float) -> Optimizer:
    """An optimizer; ``hyper`` may hold any of ``SHARED_HYPER`` (unused ones are ignored)."""
    if name not in OPTIMIZERS:
        raise OptimizerConfigError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    unknown = sorted(set(hyper) - set(SHARED_HYPER))
    if unknown:
        raise OptimizerConfigError(f"unknown hyperparameter(s) {unknown} for optimizer {name!r}")
    rules.LEARNING_RATE.check("learning_rate", learning_rate, OptimizerConfigError)
    values = {key: float(hyper.get(key, default)) for key, default in HYPER_DEFAULTS[name].items()}
    _check_ranges(name, values)
    return Optimizer(name, float(learning_rate), values)


_HYPER_RULES = {"momentum": rules.DECAY, "decay": rules.DECAY, "beta1": rules.DECAY, "beta2": rules.DECAY,
                "epsilon": rules.EPSILON}


def _check_ranges(name: str, values: dict[str, float]) -> None:
    for key, value in values.items():
        _HYPER_RULES[key].check(f"{name} {key}", value, OptimizerConfigError)


def _ops_for(array: Any):
    """The kernel module matching the array's device."""
    if type(array).__module__.startswith("cupy"):
        from orchestrator.engine import kernels_cupy

        return kernels_cupy
    from orchestrator.engine import kernels_numpy

    return kernels_numpy

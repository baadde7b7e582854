"""The public model protocol: what the runtime asks of a model, built-in or plug-in.

A model is any object with

    variables: list[Variable]            # named parameters, TF-style names ("dense/kernel")
    loss_and_grads(params, x, y, *, step, example_offset, global_batch_size, seed, train=True)
        -> (loss_sum, num_correct, grads)            or (loss_sum, num_correct, grads, metrics)
    evaluate(params, x, y) -> (mean_loss, accuracy)  or (mean_loss, accuracy, metrics)

``params`` maps each variable name to its current array (the runtime passes the values
the owners broadcast, so a model must read its weights from ``params``, not from its
variables). ``grads`` maps every variable name to an array of the variable's shape and
dtype: the gradient summed over the slice ``x, y`` and divided by ``global_batch_size``,
so the runtime's sum of the workers' grads is the full batch's mean gradient.
``loss_sum`` is the loss summed over the slice. ``num_correct`` is the number of correct
predictions, or None (regression: no accuracy is reported). ``metrics`` is an optional
dict of extra per-example sums (reported divided by the number of examples); evaluate's
``metrics`` are means over the evaluation set. Randomness must be drawn from
``(seed, step, global example index = example_offset + i)`` (``orchestrator.plugin.uniform``),
never from a generator whose state advances, so any split of the batch and any resume
draws what one uninterrupted process would.

This module holds the protocol, the checks the runtime and ``check-model`` run on a
model's answers, and the errors they raise. It never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from orchestrator.checkpoint.variables import Variable
from orchestrator.errors import KeyedError

REQUIRED_METHODS = ("loss_and_grads", "evaluate")


@runtime_checkable
class TrainableModel(Protocol):
    """The structural type the runtime trains (see the module docstring)."""

    variables: list[Variable]

    def loss_and_grads(self, params: Mapping[str, Any], x: Any, y: Any, *, step: int,
                       example_offset: int, global_batch_size: int, seed: int,
                       train: bool = True) -> tuple:
        ...

    def evaluate(self, params: Mapping[str, Any], x: Any, y: Any) -> tuple:
        ...


class PluginError(KeyedError, ValueError):
    """A plug-in (model, data or optimizer factory) breaks the protocol; ``key`` is the
    config key that names it (``model.factory``), so the CLI can point at the line."""


class GradientError(PluginError):
    """The grads a model returned do not match its variables (missing, extra, shape, dtype)."""


@dataclass
class StepOutput:
    """One ``loss_and_grads`` answer, normalised."""

    loss_sum: float
    num_correct: int | None
    grads: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalOutput:
    """One ``evaluate`` answer, normalised."""

    loss: float
    accuracy: float | None
    metrics: dict[str, float] = field(default_factory=dict)


def check_model(model: Any, where: str, key: str | None = "model.factory") -> None:
    """Raise ``PluginError`` unless ``model`` has the protocol's methods and named variables."""
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(model, name, None))]
    if missing:
        raise PluginError(f"{where} returned a {type(model).__name__} without the protocol method(s) "
                          f"{missing} (see docs/plugins.md)", key)
    variables = getattr(model, "variables", None)
    if not isinstance(variables, (list, tuple)) or not variables:
        raise PluginError(f"{where}: model.variables must be a non-empty list of "
                          f"orchestrator.checkpoint.Variable, got {type(variables).__name__}", key)
    for variable in variables:
        if not isinstance(variable, Variable):
            raise PluginError(f"{where}: model.variables holds a {type(variable).__name__}; "
                              f"every entry must be an orchestrator.checkpoint.Variable", key)
    names = [v.name for v in variables]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PluginError(f"{where}: variable name(s) {duplicates} used more than once", key)
    for variable in variables:
        if not np.issubdtype(variable.dtype, np.floating):
            raise PluginError(f"{where}: variable {variable.name!r} has dtype {variable.dtype}; "
                              f"trainable variables must be floating point", key)


def parse_step_output(result: Any, where: str = "loss_and_grads") -> StepOutput:
    """(loss_sum, num_correct, grads[, metrics]) -> ``StepOutput``; ``PluginError`` otherwise."""
    if not isinstance(result, tuple) or len(result) not in (3, 4):
        raise PluginError(f"{where} must return (loss_sum, num_correct, grads) or "
                          f"(loss_sum, num_correct, grads, metrics), got {_describe(result)}")
    loss_sum, num_correct, grads = result[:3]
    if not isinstance(grads, Mapping):
        raise PluginError(f"{where}: grads must be a dict name -> array, got {type(grads).__name__}")
    metrics = _metrics_dict(result[3] if len(result) == 4 else None, where)
    correct = None if num_correct is None else int(num_correct)
    return StepOutput(_scalar(loss_sum, where, "loss_sum"), correct, dict(grads), metrics)


def parse_eval_output(result: Any, where: str = "evaluate") -> EvalOutput:
    """(mean_loss, accuracy[, metrics]) -> ``EvalOutput``; ``PluginError`` otherwise."""
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise PluginError(f"{where} must return (mean_loss, accuracy) or (mean_loss, accuracy, metrics), "
                          f"got {_describe(result)}")
    accuracy = None if result[1] is None else _scalar(result[1], where, "accuracy")
    metrics = _metrics_dict(result[2] if len(result) == 3 else None, where)
    return EvalOutput(_scalar(result[0], where, "mean_loss"), accuracy, metrics)


def check_grads(grads: Mapping[str, Any], variables: Mapping[str, Variable] | list[Variable],
                where: str = "loss_and_grads") -> None:
    """Raise ``GradientError`` naming the first variable whose gradient is missing, extra,
    or of another shape or dtype than the variable."""
    by_name = variables if isinstance(variables, Mapping) else {v.name: v for v in variables}
    missing = [name for name in by_name if name not in grads]
    extra = sorted(name for name in grads if name not in by_name)
    if missing or extra:
        parts = ([f"no gradient for variable(s) {missing}"] if missing else []) + \
                ([f"gradient(s) {extra} name no variable"] if extra else [])
        raise GradientError(f"{where}: {'; '.join(parts)} (variables: {list(by_name)})", "model.factory")
    for name, variable in by_name.items():
        grad = grads[name]
        shape, dtype = tuple(getattr(grad, "shape", ())), getattr(grad, "dtype", None)
        if shape != variable.shape:
            raise GradientError(f"{where}: gradient of {name!r} has shape {list(shape)}, "
                                f"the variable has {list(variable.shape)}", "model.factory")
        if dtype is None or np.dtype(dtype) != variable.dtype:
            raise GradientError(f"{where}: gradient of {name!r} has dtype {dtype}, "
                                f"the variable has {variable.dtype}", "model.factory")


def _scalar(value: Any, where: str, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PluginError(f"{where}: {what} must be a number, got {_describe(value)}") from None


def _metrics_dict(metrics: Any, where: str) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise PluginError(f"{where}: metrics must be a dict name -> number, got {_describe(metrics)}")
    return {name: _scalar(value, where, f"metric {name!r}") for name, value in metrics.items()}


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return type(value).__name__

"""The checks ``orchestrator check-model`` runs on a model, built-in or plug-in.

On a small batch of the job's data, one line each:

- ``grads``: one gradient per variable, with the variable's name, shape and dtype;
- ``determinism``: two calls with the same (seed, step, example_offset) agree bit for bit
  (randomness drawn from a generator whose state advances fails here);
- ``split batch``: the grads (and loss sums) of two halves of the batch, each called with
  its own ``example_offset`` and the full ``global_batch_size``, add up to the full
  batch's (what M workers compute must equal what one computes);
- ``gradient <variable>``: a central finite difference of the loss in float64 along a random
  direction agrees with the returned gradient, for every variable;
- ``evaluate``: returns (mean_loss, accuracy[, metrics]).

The float64 checks cast the parameters and features to float64, so a model must compute
in the dtype of ``params`` (the built-in models do). Randomness follows the protocol's
rule, so every call of a check sees the same dropout masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from orchestrator.engine import protocol

SPLIT_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
FD_EPSILON = 1e-6
FD_RTOL = 1e-4
CHECK_STEP = 3  # any step: draws differ from step 0, which a model may special-case


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def run_checks(model: Any, x: np.ndarray, y: np.ndarray, seed: int) -> list[CheckResult]:
    """Every check on the batch ``x, y`` (at least 2 examples); never raises for a bad model."""
    checks: list[tuple[str, Callable[[], CheckResult | list[CheckResult]]]] = [
        ("grads", lambda: check_grad_structure(model, x, y, seed)),
        ("determinism", lambda: check_determinism(model, x, y, seed)),
        ("split batch", lambda: check_split(model, x, y, seed)),
        ("gradients", lambda: check_finite_differences(model, x, y, seed)),
        ("evaluate", lambda: check_evaluate(model, x, y)),
    ]
    results: list[CheckResult] = []
    for name, check in checks:
        outcome = _guarded(name, check)
        results.extend(outcome if isinstance(outcome, list) else [outcome])
    return results


def _guarded(name: str, check: Callable[[], Any]) -> Any:
    try:
        return check()
    except protocol.PluginError as exc:
        return CheckResult(name, False, str(exc))
    except Exception as exc:  # a plug-in raising is a finding, reported on its line
        return CheckResult(name, False, f"raised {type(exc).__name__}: {exc}")


def _params(model: Any, dtype: Any = None) -> dict[str, Any]:
    """name -> value (``dtype``: a float64 host copy, for the finite differences)."""
    return {v.name: v.value if dtype is None else np.array(_host(v.value), dtype=dtype) for v in model.variables}


def _call(model: Any, params: dict, x: Any, y: Any, seed: int, offset: int = 0,
          batch: int | None = None) -> protocol.StepOutput:
    result = model.loss_and_grads(params, x, y, step=CHECK_STEP, example_offset=offset,
                                  global_batch_size=batch or len(y), seed=seed, train=True)
    return protocol.parse_step_output(result)


def _host(array: Any) -> np.ndarray:
    get = getattr(array, "get", None)
    return np.asarray(get() if callable(get) and type(array).__module__.startswith("cupy") else array)


def check_grad_structure(model: Any, x: np.ndarray, y: np.ndarray, seed: int) -> CheckResult:
    out = _call(model, _params(model), x, y, seed)
    protocol.check_grads(out.grads, model.variables)
    described = ", ".join(f"{v.name} {list(v.shape)} {v.dtype}" for v in model.variables)
    return CheckResult("grads", True, f"names, shapes and dtypes match the variables ({described})")


def check_determinism(model: Any, x: np.ndarray, y: np.ndarray, seed: int) -> CheckResult:
    name = "determinism"
    first, second = (_call(model, _params(model), x, y, seed) for _ in range(2))
    where = f"two calls with (seed {seed}, step {CHECK_STEP}, offset 0)"
    if first.loss_sum != second.loss_sum:
        return CheckResult(name, False, f"{where} return losses {first.loss_sum!r} and {second.loss_sum!r}: "
                                        f"draw randomness from (seed, step, example index), e.g. "
                                        f"orchestrator.plugin.uniform")
    for key in first.grads:
        if not np.array_equal(_host(first.grads[key]), _host(second.grads.get(key))):
            return CheckResult(name, False, f"{where} return different gradients for {key!r}: draw randomness "
                                            f"from (seed, step, example index), e.g. orchestrator.plugin.uniform")
    return CheckResult(name, True, f"{where} agree bit for bit")


def check_split(model: Any, x: np.ndarray, y: np.ndarray, seed: int) -> CheckResult:
    name, n = "split batch", len(y)
    half = n // 2
    full = _call(model, _params(model), x, y, seed)
    parts = [_call(model, _params(model), x[:half], y[:half], seed, 0, n),
             _call(model, _params(model), x[half:], y[half:], seed, half, n)]
    where = f"[0:{half}] + [{half}:{n}] vs [0:{n}]"
    loss = parts[0].loss_sum + parts[1].loss_sum
    if not math.isclose(loss, full.loss_sum, rel_tol=1e-5, abs_tol=1e-6):
        return CheckResult(name, False, f"loss sums of {where}: {loss:.6g} vs {full.loss_sum:.6g}; loss_sum must "
                                        f"be summed over the slice, not averaged")
    worst = 0.0
    for key, grad in full.grads.items():
        expected = _host(grad).astype(np.float64)
        summed = _host(parts[0].grads[key]).astype(np.float64) + _host(parts[1].grads[key]).astype(np.float64)
        error = _relative(summed, expected)
        worst = max(worst, error)
        if error > SPLIT_RTOL.get(np.dtype(_host(grad).dtype), 1e-4):
            return CheckResult(name, False, f"grads of {key!r} over {where} differ (rel. error {error:.1e}): "
                                            f"sum over the slice and divide by global_batch_size, and draw "
                                            f"randomness for example example_offset + i")
    return CheckResult(name, True, f"grads and loss sums of {where} agree (max rel. error {worst:.1e})")


def check_finite_differences(model: Any, x: np.ndarray, y: np.ndarray, seed: int) -> list[CheckResult]:
    params = _params(model, np.float64)
    x64 = np.asarray(x, dtype=np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating) else x
    y64 = np.asarray(y, dtype=np.float64) if np.issubdtype(np.asarray(y).dtype, np.floating) else y
    grads = _call(model, params, x64, y64, seed).grads
    directions = np.random.default_rng(seed)
    return [_fd_one(model, params, grads, name, directions, x64, y64, seed) for name in params]


def _fd_one(model, params, grads, name, directions, x, y, seed) -> CheckResult:
    check = f"gradient {name}"
    if name not in grads:
        return CheckResult(check, False, "loss_and_grads returned no gradient for this variable")
    direction = directions.standard_normal(params[name].shape)
    analytic = float(np.sum(_host(grads[name]).astype(np.float64) * direction))

    def loss_at(sign: float) -> float:
        moved = dict(params)
        moved[name] = params[name] + sign * FD_EPSILON * direction
        return _call(model, moved, x, y, seed).loss_sum / len(y)

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * FD_EPSILON)
    error = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-8)
    if not math.isfinite(numeric) or error > FD_RTOL:
        return CheckResult(check, False, f"finite difference (float64) {numeric:.6g} vs returned gradient "
                                         f"{analytic:.6g} along a random direction (rel. error {error:.1e})")
    return CheckResult(check, True, f"finite difference (float64) agrees (rel. error {error:.1e})")


def check_evaluate(model: Any, x: np.ndarray, y: np.ndarray) -> CheckResult:
    out = protocol.parse_eval_output(model.evaluate(_params(model), x, y))
    accuracy = "no accuracy (regression)" if out.accuracy is None else f"accuracy {out.accuracy:.4g}"
    extra = f", metrics {sorted(out.metrics)}" if out.metrics else ""
    if not math.isfinite(out.loss):
        return CheckResult("evaluate", False, f"mean loss is {out.loss}")
    return CheckResult("evaluate", True, f"mean loss {out.loss:.4g}, {accuracy}{extra}")


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale

"""Value rules shared by the job config and the Python API: one definition per rule.

A YAML user meets a rule through ``orchestrator/config.py`` (the schema turns each ``Bound``
into pydantic limits, hence into the JSON Schema and docs/config.md); a Python user meets
the same rule, in the same words, when calling the library directly
(``CheckpointManager(max_to_keep=-1)``, ``make_optimizer(...)``, ``Sampler(...)``,
``FailurePolicy(...)``). This module is a leaf: it imports nothing from the project but the error base, so
``checkpoint/`` and ``engine/`` can use it without depending on the config layer.

The upper limits are not taste: each one stops a value that would exhaust memory or time
before the first step (a 10^12-step job, a 10^7-wide layer), so a typo fails at
``validate`` instead of an hour into a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import InvalidArgumentError

# A value larger than any real job uses; protects memory and time from a typo.
MAX_STEPS = 10**9
MAX_EXAMPLES = 10**8            # synthetic dataset rows
MAX_WIDTH = 65536               # features per example and units per hidden layer
MAX_CLASSES = 65536
MAX_WORKERS = 4096
MAX_HOURS = 24 * 365 * 100.0    # keep_checkpoint_every_n_hours: a century
MAX_LAYERS = 64                 # hidden layers
MAX_SYNTHETIC_FLOATS = 1 << 28  # synthetic features held in memory: 1 GiB of float32


@dataclass(frozen=True)
class Bound:
    """A numeric range (each end open, closed or absent); ``text`` completes "must be ..."."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, value: Any) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    @property
    def text(self) -> str:
        low = f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}" if self.ge is not None else None
        high = f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]" if self.le is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>' if self.gt is not None else '>='} {low[1:]}"
        if high:
            return f"{'<' if self.lt is not None else '<='} {high[:-1]}"
        return "a finite number"

    def limits(self) -> dict[str, float]:
        """The ends as keyword arguments (``gt``/``ge``/``lt``/``le``), e.g. for ``pydantic.Field``."""
        ends = {"gt": self.gt, "ge": self.ge, "lt": self.lt, "le": self.le}
        return {name: value for name, value in ends.items() if value is not None}

    def problem(self, value: Any) -> str:
        return f"must be {self.text} (got {value!r})"

    def check(self, name: str, value: Any, error: type[Exception] = InvalidArgumentError) -> None:
        """Raise ``error("<name>: must be ... (got ...)")`` unless ``value`` is in range."""
        if not self.holds(value):
            raise error(f"{name}: {self.problem(value)}")


def _num(value: float) -> str:
    """``1000000000`` for 1e9, ``0`` for 0.0, ``0.5`` for 0.5."""
    return str(int(value)) if float(value).is_integer() else repr(value)


# ---------------------------------------------------------------------------- checkpoint retention
MAX_TO_KEEP = Bound(ge=0)                   # 0 (or None) keeps every checkpoint, as in TF
KEEP_EVERY_N_HOURS = Bound(gt=0, le=MAX_HOURS)
KEEP_BEST = Bound(ge=1)
BEST_MODES = ("min", "max")
KEEP_BEST_NEEDS_METRIC = "needs best_metric (the reported metric to rank checkpoints by, e.g. loss)"


def check_best_mode(mode: Any, error: type[Exception] = InvalidArgumentError) -> None:
    if mode not in BEST_MODES:
        raise error(f"best_mode: must be one of {', '.join(BEST_MODES)} (got {mode!r})")


# ---------------------------------------------------------------------------- optimizers
LEARNING_RATE = Bound(gt=0)
DECAY = Bound(ge=0, lt=1)                   # momentum, rmsprop decay, adam beta1/beta2
EPSILON = Bound(gt=0)

# ---------------------------------------------------------------------------- data
EXAMPLES = Bound(ge=1, le=MAX_EXAMPLES)
WIDTH = Bound(ge=1, le=MAX_WIDTH)
CLASSES = Bound(ge=2, le=MAX_CLASSES)
BATCH = Bound(ge=1, le=MAX_EXAMPLES)
PROBABILITY = Bound(gt=0, le=1)             # dropout keep probabilities
DROPOUT_RATE = Bound(ge=0, lt=1)            # layer-library dropout rates
# Training examples of the bundled digits (scikit-learn's 1797, less the stratified 20 % test split),
# known without loading them; tests/engine/test_data.py checks it against load_digits().
DIGITS_TRAIN_EXAMPLES = 1438


def batch_problem(global_batch_size: int, examples: int) -> str | None:
    """A global batch larger than the training set would hold one example twice in one step."""
    if global_batch_size > examples:
        return f"must be <= the {examples} training examples of the dataset (got {global_batch_size})"
    return None


def synthetic_problem(num_examples: int, input_dim: int) -> str | None:
    """Synthetic features are generated in memory: num_examples (plus 20 % test) x input_dim float32."""
    floats = (num_examples + max(1, num_examples // 5)) * input_dim
    if floats > MAX_SYNTHETIC_FLOATS:
        return (f"{num_examples} examples x {input_dim} features is {floats * 4 / 2**30:.1f} GiB of data; "
                f"at most {MAX_SYNTHETIC_FLOATS * 4 >> 30} GiB is generated")
    return None

FRACTION = Bound(gt=0, lt=1)                # data.eval_fraction

# ---------------------------------------------------------------------------- plug-ins
FACTORY = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"   # package.module:callable.attr
FACTORY_TEXT = "'module:callable' (e.g. my_models:build)"
CODE_MB = Bound(gt=0)

# ---------------------------------------------------------------------------- job and cluster
STEPS = Bound(ge=1, le=MAX_STEPS)
WORKERS = Bound(ge=1, le=MAX_WORKERS)
UNLIMITED = -1
MAX_FAILURES = Bound(ge=UNLIMITED)          # -1 = unlimited
BACKOFF_S = Bound(ge=0)


def check_worker_range(min_workers: int, max_workers: int, error: type[Exception] = InvalidArgumentError) -> None:
    """``1 <= workers.min <= workers.max``."""
    WORKERS.check("workers.min", min_workers, error)
    WORKERS.check("workers.max", max_workers, error)
    if min_workers > max_workers:
        raise error(f"workers.min: {min_exceeds_max(min_workers, max_workers)}")


def min_exceeds_max(min_workers: int, max_workers: int) -> str:
    return f"must be <= workers.max ({min_workers} > {max_workers})"

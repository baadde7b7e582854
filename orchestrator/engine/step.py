"""The training step: one definition, used by the single-process loop and by every worker.

    trainer = Trainer(model, optimizer, Sampler(n, batch, seed), dataset, seed)
    metrics = trainer.train_step()       # one global step: batch, grads, update, global_step += 1
    trainer.state_variables()            # parameters, optimizer slots, global_step (what a checkpoint holds)

``TrainStep`` is the step as rank r of M does it: draw the global batch, take this
rank's contiguous slice, compute its gradients (``loss_and_grads``, checked against
the protocol), let the ``exchange`` sum every rank's gradients of the variables this
rank owns (in rank order), apply the optimizer to those, and let the exchange bring
every other owner's new parameters here. With M=1 the exchange is ``LocalExchange``
(nothing to move) and the step is the whole single-process step; the runtime's
workers run the same object with a peer exchange (``orchestrator.cluster.exchange``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from orchestrator.checkpoint.errors import CheckpointNotFoundError
from orchestrator.checkpoint.variables import Variable
from orchestrator.engine import protocol
from orchestrator.engine.data import Dataset, Sampler
from orchestrator.engine.host_memory import retain_freed_memory
from orchestrator.engine.optimizers import Optimizer

GLOBAL_STEP = "global_step"


@dataclass(frozen=True)
class StepMetrics:
    """Metrics of one training step: step is the global_step after the update."""

    step: int
    loss: float
    accuracy: float


@dataclass
class SliceMetrics:
    """One rank's share of one step's metrics (sums over its examples), plus every rank's loss sum."""

    loss_sum: float
    num_correct: float | None
    examples: int
    sums: dict[str, float] = field(default_factory=dict)
    global_loss_sum: float = 0.0   # sum over ranks in rank order: the same number on every rank

    def as_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "num_correct": self.num_correct, "examples": self.examples,
                "sums": self.sums}


class Exchange(Protocol):
    """How the ranks of one job combine a step (see ``orchestrator.cluster.exchange``)."""

    def reduce(self, step: int, grads: Mapping[str, Any], owned: Sequence[str]) -> dict[str, Any]:
        """Each owned variable's gradient summed over ranks 0..M-1, in that order."""

    def share(self, step: int, loss_sum: float) -> list[float]:
        """After the update: every owner's parameters reach every rank; every rank's loss sum."""


class LocalExchange:
    """M=1: every variable is owned here and nothing moves."""

    seconds = 0.0

    def reduce(self, step: int, grads: Mapping[str, Any], owned: Sequence[str]) -> dict[str, Any]:
        return {name: grads[name] for name in owned}

    def share(self, step: int, loss_sum: float) -> list[float]:
        return [loss_sum]

    def close(self) -> None:
        pass


def apply_gradients(optimizer: Optimizer, variables: Iterable[Variable], grads: Mapping[str, Any],
                    slots: Mapping[str, list[Variable]], step: int) -> None:
    """Apply ``grads[v.name]`` to each of ``variables`` (update number ``step``)."""
    for variable in variables:
        optimizer.apply(variable, grads[variable.name], slots[variable.name], step)


def accepts_reuse_buffers(model: Any) -> bool:
    """Built-in models can return gradients in reused buffers (no allocation per step); plug-ins need not."""
    try:
        return "reuse_buffers" in inspect.signature(model.loss_and_grads).parameters
    except (TypeError, ValueError):
        return False


class TrainStep:
    """One global step as rank ``rank`` of ``world`` does it (see the module docstring).

    ``owned``: the names this rank updates (all of them for M=1); ``slots``: their
    optimizer slots; ``xp``: the array module the batch indices go to. ``before_update`` runs between the exchange and the update (the
    runtime waits there for an async save to have copied the values about to change).
    """

    def __init__(self, model: Any, optimizer: Optimizer, sampler: Sampler, train_x: Any, train_y: Any, *,
                 seed: int, global_batch_size: int, owned: Sequence[str], slots: Mapping[str, list[Variable]],
                 rank: int = 0, world: int = 1, xp: Any = np, before_update: Callable[[], None] = lambda: None):
        self.model, self.optimizer, self.sampler = model, optimizer, sampler
        self.train_x, self.train_y = train_x, train_y
        self.seed, self.global_batch_size = seed, global_batch_size
        self.variables = {v.name: v for v in model.variables}
        self.owned, self.slots = list(owned), slots
        self.rank, self.world = rank, world
        self.before_update, self.xp = before_update, xp
        self.reuse_buffers = accepts_reuse_buffers(model)
        if xp is np:
            retain_freed_memory()       # host arrays: keep each step's freed memory for the next

    def __call__(self, step: int, exchange: Exchange) -> SliceMetrics:
        local, offset = self.sampler.split(self.sampler.next_batch(), self.rank, self.world)
        local = self.xp.asarray(local)  # host -> device on cupy
        extra = {"reuse_buffers": True} if self.reuse_buffers else {}
        params = {name: variable.value for name, variable in self.variables.items()}
        out = protocol.parse_step_output(self.model.loss_and_grads(
            params, self.train_x[local], self.train_y[local], step=step, example_offset=offset,
            global_batch_size=self.global_batch_size, seed=self.seed, train=True, **extra))
        protocol.check_grads(out.grads, self.variables, f"step {step}: loss_and_grads")
        totals = exchange.reduce(step, out.grads, self.owned)
        self.before_update()
        apply_gradients(self.optimizer, (self.variables[n] for n in self.owned), totals, self.slots, step)
        losses = exchange.share(step, out.loss_sum)
        total = 0.0
        for loss in losses:  # rank order: every rank adds the same numbers the same way
            total += loss
        return SliceMetrics(out.loss_sum, out.num_correct, int(len(local)), out.metrics, total)


class Trainer:
    """One process doing the whole global batch: the reference the distributed runtime must match."""

    def __init__(self, model: Any, optimizer: Optimizer, sampler: Sampler, dataset: Dataset, seed: int):
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.seed = seed
        self.slots = {v.name: optimizer.create_slots(v) for v in model.variables}
        self.global_step = Variable(GLOBAL_STEP, np.zeros((), dtype=np.int64), trainable=False)
        backend = model.backend
        self._test_x = backend.asarray(dataset.test_x)
        self._test_y = backend.asarray(dataset.test_y)
        self._step = TrainStep(model, optimizer, sampler, backend.asarray(dataset.train_x),  # host -> device once
                               backend.asarray(dataset.train_y), seed=seed,
                               global_batch_size=sampler.global_batch_size,
                               owned=[v.name for v in model.variables], slots=self.slots, xp=backend.xp)
        self._exchange = LocalExchange()

    @property
    def step(self) -> int:
        return int(self.global_step.value)

    def train_step(self) -> StepMetrics:
        metrics = self._step(self.step, self._exchange)
        self.global_step.assign(self.step + 1)
        return StepMetrics(self.step, metrics.loss_sum / metrics.examples, (metrics.num_correct or 0) / metrics.examples)

    def evaluate(self) -> tuple[float, float]:
        """(mean loss, accuracy) on the test split, without dropout."""
        return self.model.evaluate(None, self._test_x, self._test_y)

    def state_variables(self) -> list[Variable]:
        """Parameters, then each parameter's slots, then global_step."""
        slots = [slot for v in self.model.variables for slot in self.slots[v.name]]
        return [*self.model.variables, *slots, self.global_step]

    def restore(self, tensors: Mapping[str, Any], iterator_state: Mapping[str, int]) -> None:
        """Set every state variable from ``tensors`` (by name) and the sampler position."""
        variables = self.state_variables()
        missing = [v.name for v in variables if v.name not in tensors]
        if missing:
            raise CheckpointNotFoundError(f"checkpoint lacks training state {missing}")
        for variable in variables:
            variable.assign(tensors[variable.name])
        self.sampler.set_state(iterator_state)

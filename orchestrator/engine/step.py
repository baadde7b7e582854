"""The single-process training loop's building blocks (also used by the runtime).

    trainer = Trainer(model, optimizer, Sampler(n, batch, seed), dataset, seed)
    metrics = trainer.train_step()       # one global step: batch, grads, update, global_step += 1
    trainer.state_variables()            # parameters, optimizer slots, global_step (what a checkpoint holds)

``apply_gradients`` updates any subset of variables, which is what a worker that
owns only some variables calls with the summed gradients it received.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.checkpoint.errors import CheckpointNotFoundError
from orchestrator.checkpoint.variables import Variable
from orchestrator.engine.data import Dataset, Sampler
from orchestrator.engine.models import Model
from orchestrator.engine.optimizers import Optimizer

GLOBAL_STEP = "global_step"


@dataclass(frozen=True)
class StepMetrics:
    """Metrics of one training step: step is the global_step after the update."""

    step: int
    loss: float
    accuracy: float


def apply_gradients(optimizer: Optimizer, variables: Iterable[Variable], grads: Mapping[str, Any],
                    slots: Mapping[str, list[Variable]], step: int) -> None:
    """Apply ``grads[v.name]`` to each of ``variables`` (update number ``step``)."""
    for variable in variables:
        optimizer.apply(variable, grads[variable.name], slots[variable.name], step)


class Trainer:
    """One process doing the whole global batch: the reference the distributed runtime must match."""

    def __init__(self, model: Model, optimizer: Optimizer, sampler: Sampler, dataset: Dataset, seed: int):
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.seed = seed
        self.slots = {v.name: optimizer.create_slots(v) for v in model.variables}
        self.global_step = Variable(GLOBAL_STEP, np.zeros((), dtype=np.int64), trainable=False)
        backend = model.backend
        self._train_x = backend.asarray(dataset.train_x)   # host -> device once on cupy
        self._train_y = backend.asarray(dataset.train_y)
        self._test_x = backend.asarray(dataset.test_x)
        self._test_y = backend.asarray(dataset.test_y)

    @property
    def step(self) -> int:
        return int(self.global_step.value)

    def train_step(self) -> StepMetrics:
        indices = self.model.backend.asarray(self.sampler.next_batch())
        x, y = self._train_x[indices], self._train_y[indices]
        loss_sum, correct, grads = self.model.loss_and_grads(
            self.model.params(), x, y, step=self.step, example_offset=0,
            global_batch_size=len(indices), seed=self.seed, reuse_buffers=True)
        apply_gradients(self.optimizer, self.model.variables, grads, self.slots, self.step)
        self.global_step.assign(self.step + 1)
        return StepMetrics(self.step, loss_sum / len(indices), correct / len(indices))

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

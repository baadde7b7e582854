"""Checks a job passes before anything starts or is written (``orchestrator train`` runs them).

1. every factory the config names imports and is callable;
2. the plug-in code to ship fits ``code.max_size_mb``;
3. the data loads and passes its checks (keys and columns exist, lengths agree, labels in
   range, no NaN/inf, one global batch fits in the training set);
4. the model builds and keeps the protocol, and one training step on a few examples returns
   a finite loss and one gradient per variable with the variable's shape and dtype;
5. the optimizer creates its slots;
6. ``init_from``: the checkpoint reads, and the variables and renames it names exist in it and in
   the model, with matching shapes (``checkpoint.warm_start``).

Each failure raises the error of its layer (``PluginError``, ``DatasetError``,
``ClusterSetupError``, ``WarmStartError``) with the config key at fault, which the CLI turns into one
``file:line: key: message`` line and exit code 2. The loaded dataset is returned so the
job does not read it twice (a directory of shards: its checked plan; the workers read the
shards). The checks run on numpy (CPU), whatever ``device`` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestrator import rules
from orchestrator.cluster import recipe, shipping
from orchestrator.engine import plugins, protocol
from orchestrator.engine.backend import numpy_backend
from orchestrator.engine.data import Dataset, DatasetError
from orchestrator.engine.files import ShardPlan

CHECK_EXAMPLES = 8


@dataclass
class Prepared:
    """What the checks loaded, for the job to reuse."""

    dataset: Dataset | ShardPlan


def import_factories(config) -> None:
    """Step 1: import every configured factory (``PluginError`` at its key)."""
    recipe.add_code_paths(config)
    for group in ("model", "data", "optimizer"):
        name = getattr(config, group).factory
        if name:
            plugins.import_callable(name, f"{group}.factory")


def preflight(config) -> Prepared:
    """Run every check (see the module docstring); returns the loaded dataset (or shard plan)."""
    import_factories(config)
    shipping.check_size(config)
    data = load_checked_data(config)
    sample = _sample(data)
    model = recipe.build_model(config, sample, numpy_backend())
    check_first_step(model, sample, config)
    check_optimizer(model, config)
    check_init_from(model, config)
    return Prepared(data)


def build_on_cpu(config) -> tuple[Any, Dataset]:
    """(the job's model built on numpy with the job's seed, the job's dataset; for a directory
    of shards, its first shard)."""
    import_factories(config)
    sample = _sample(load_checked_data(config))
    return recipe.build_model(config, sample, numpy_backend()), sample


def load_checked_data(config) -> Dataset | ShardPlan:
    """The job's data, with one global batch checked to fit (for shards: every worker's slice)."""
    data = recipe.load_data(config)
    batch = config.data.global_batch_size
    if isinstance(data, ShardPlan):
        data.check_workers(batch, range(config.workers.min, config.workers.max + 1))
        return data
    too_large = rules.batch_problem(batch, len(data.train_y))
    if too_large:
        raise DatasetError(too_large, "data.global_batch_size")
    return data


def _sample(data: Dataset | ShardPlan) -> Dataset:
    return data.sample() if isinstance(data, ShardPlan) else data


def check_first_step(model: Any, dataset: Dataset, config) -> None:
    """One ``loss_and_grads`` on the first examples, as step 0 of the job would call it."""
    count = min(CHECK_EXAMPLES, len(dataset.train_y))
    params = {v.name: v.value for v in model.variables}
    where = "the first training step: loss_and_grads"
    try:
        result = model.loss_and_grads(params, dataset.train_x[:count], dataset.train_y[:count], step=0,
                                      example_offset=0, global_batch_size=count, seed=int(config.seed),
                                      train=True)
    except Exception as exc:
        raise protocol.PluginError(f"{where} raised {type(exc).__name__}: {exc}", "model.factory") from exc
    out = protocol.parse_step_output(result, where)
    protocol.check_grads(out.grads, model.variables, where)
    if not math.isfinite(out.loss_sum):
        raise protocol.PluginError(f"{where} returned loss {out.loss_sum} for the initial weights", "model.factory")


def check_optimizer(model: Any, config) -> None:
    """The optimizer creates slots with names of their own for every variable."""
    optimizer = recipe.make_optimizer(config)
    key = "optimizer.factory" if config.optimizer.factory else "optimizer.name"
    taken = {v.name for v in model.variables}
    for variable in model.variables:
        try:
            slots = list(optimizer.create_slots(variable))
        except Exception as exc:
            raise protocol.PluginError(f"create_slots({variable.name!r}) raised {type(exc).__name__}: {exc}",
                                       key) from exc
        for slot in slots:
            if not hasattr(slot, "name") or not hasattr(slot, "value"):
                raise protocol.PluginError(f"create_slots({variable.name!r}) must return Variables, "
                                           f"got a {type(slot).__name__}", key)
            if slot.name in taken:
                raise protocol.PluginError(f"slot name {slot.name!r} of {variable.name!r} is already taken "
                                           f"by another variable or slot", key)
            taken.add(slot.name)


def check_init_from(model: Any, config) -> Any:
    """Step 6: the warm start plan can be made (``WarmStartError`` at its key); returns it (None
    without ``init_from``). Nothing is assigned."""
    if config.init_from is not None:
        return recipe.warm_start_plan(config, model.variables)
    return None

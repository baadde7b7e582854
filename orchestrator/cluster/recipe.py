"""Config -> engine objects, shared by every worker (and by tests that train in one process).

Everything a worker builds is a pure function of the job config, so M workers that
each call these functions hold identical models, datasets and samplers. The driver
side (coordinator, supervisor) builds its ``CheckpointManager`` here too, so both see
the same retention settings.
"""

from __future__ import annotations

from typing import Any

from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.engine import data as data_lib
from orchestrator.engine import models as models_lib
from orchestrator.engine import optimizers as optimizers_lib

# OptimizerConfig fields passed to make_optimizer; each rule ignores the ones it does not use.
_HYPERPARAMETERS = ("momentum", "decay", "beta1", "beta2", "epsilon")


def plain(value: Any) -> Any:
    """The value of a str Enum member, or the value itself."""
    return getattr(value, "value", value)


def checkpoint_options(config) -> dict[str, Any]:
    """The fsspec options of ``checkpoint.dir`` as a fresh dict (may hold Secrets)."""
    return dict(config.checkpoint.storage_options or {})


def checkpoint_manager(config) -> CheckpointManager:
    """A manager of the job's checkpoint directory with the job's retention settings."""
    ckpt = config.checkpoint
    return CheckpointManager(
        ckpt.dir, max_to_keep=ckpt.max_to_keep or None,
        keep_checkpoint_every_n_hours=ckpt.keep_checkpoint_every_n_hours,
        best_metric=ckpt.best_metric, best_mode=plain(ckpt.best_mode), keep_best=ckpt.keep_best,
        storage_options=checkpoint_options(config), fsync=ckpt.fsync)


def load_data(config) -> "data_lib.Dataset":
    cfg = config.data
    name = plain(cfg.dataset)
    opts: dict[str, Any] = {}
    if name == "synthetic":
        opts = {"num_examples": cfg.num_examples, "input_dim": cfg.input_dim,
                "num_classes": cfg.num_classes, "seed": config.seed}
    return data_lib.load_dataset(name, path=cfg.path, storage_options=dict(cfg.storage_options or {}), **opts)


def num_classes(config, dataset) -> int:
    if plain(config.data.dataset) == "synthetic":
        return int(config.data.num_classes)
    known = getattr(dataset, "num_classes", None)
    return int(known) if known else int(dataset.train_y.max()) + 1


def model_spec(config, dataset) -> "models_lib.ModelSpec":
    cfg = config.model
    kind = plain(cfg.kind)
    return models_lib.ModelSpec(
        kind=kind,
        input_dim=int(dataset.train_x.shape[1]),
        hidden=tuple(int(h) for h in cfg.hidden) if kind == "mlp" else (),
        num_classes=num_classes(config, dataset),
        activation=plain(cfg.activation),
        keep_prob_input=float(cfg.keep_prob_input),
        keep_prob_hidden=float(cfg.keep_prob_hidden),
    )


def make_optimizer(config) -> "optimizers_lib.Optimizer":
    cfg = config.optimizer
    name = plain(cfg.name)
    hyper = {field: getattr(cfg, field) for field in _HYPERPARAMETERS}
    return optimizers_lib.make_optimizer(name, cfg.learning_rate, **hyper)


def make_sampler(config, dataset, seed: int) -> "data_lib.Sampler":
    return data_lib.Sampler(len(dataset.train_y), config.data.global_batch_size, seed)

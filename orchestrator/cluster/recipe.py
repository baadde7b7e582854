"""Config -> engine objects, shared by every worker (and by tests that train in one process).

Everything a worker builds is a pure function of the job config, so M workers that
each call these functions hold identical models, datasets and samplers. The driver
side (coordinator, supervisor) builds its ``CheckpointManager`` here too, so both see
the same retention settings.
"""

from __future__ import annotations

from typing import Any

from orchestrator import rules
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.config import ConfigError, Dataset, JobConfig, ModelKind
from orchestrator.engine import data as data_lib
from orchestrator.engine import models as models_lib
from orchestrator.engine import optimizers as optimizers_lib


def checkpoint_options(config: JobConfig) -> dict[str, Any]:
    """The fsspec options of ``checkpoint.dir`` as a fresh dict (may hold Secrets)."""
    return dict(config.checkpoint.storage_options or {})


def checkpoint_manager(config: JobConfig) -> CheckpointManager:
    """A manager of the job's checkpoint directory with the job's retention settings."""
    ckpt = config.checkpoint
    return CheckpointManager(
        ckpt.dir, max_to_keep=ckpt.max_to_keep or None,
        keep_checkpoint_every_n_hours=ckpt.keep_checkpoint_every_n_hours,
        best_metric=ckpt.best_metric, best_mode=ckpt.best_mode.value, keep_best=ckpt.keep_best,
        storage_options=checkpoint_options(config), fsync=ckpt.fsync)


def load_data(config: JobConfig) -> "data_lib.Dataset":
    cfg = config.data
    opts: dict[str, Any] = {}
    if cfg.dataset is Dataset.SYNTHETIC:
        opts = {"num_examples": cfg.num_examples, "input_dim": cfg.input_dim,
                "num_classes": cfg.num_classes, "seed": config.seed}
    return data_lib.load_dataset(cfg.dataset.value, path=cfg.path, storage_options=dict(cfg.storage_options),
                                 **opts)


def check_data(config: JobConfig, source: str | None = None) -> None:
    """Before Ray starts: the data the job names can be read and one global batch fits in it.

    Sizes known without reading data were checked with the config; mnist is counted from its
    labels file. Raises ConfigError naming the key (and ``source``, the config file).
    """
    data = config.data
    if data.known_train_examples is not None or data.dataset is not Dataset.MNIST:
        return  # checked with the config, or known only once loaded
    try:
        examples = data_lib.mnist_train_examples(data.path, dict(data.storage_options))
    except (data_lib.DatasetError, OSError) as exc:
        raise ConfigError(str(exc), source, key="data.path") from None
    too_large = rules.batch_problem(data.global_batch_size, examples)
    if too_large:
        raise ConfigError(too_large, source, key="data.global_batch_size")


def num_classes(config: JobConfig, dataset) -> int:
    if config.data.dataset is Dataset.SYNTHETIC:
        return int(config.data.num_classes)
    known = getattr(dataset, "num_classes", None)
    return int(known) if known else int(dataset.train_y.max()) + 1


def model_spec(config: JobConfig, dataset) -> "models_lib.ModelSpec":
    cfg = config.model
    return models_lib.ModelSpec(
        kind=cfg.kind.value,
        input_dim=int(dataset.train_x.shape[1]),
        hidden=tuple(int(h) for h in cfg.hidden) if cfg.kind is ModelKind.MLP else (),
        num_classes=num_classes(config, dataset),
        activation=cfg.activation.value,
        keep_prob_input=float(cfg.keep_prob_input),
        keep_prob_hidden=float(cfg.keep_prob_hidden),
    )


def make_optimizer(config: JobConfig) -> "optimizers_lib.Optimizer":
    cfg = config.optimizer
    hyper = {field: getattr(cfg, field) for field in optimizers_lib.SHARED_HYPER}  # each rule uses its own
    return optimizers_lib.make_optimizer(cfg.name.value, cfg.learning_rate, **hyper)


def make_sampler(config: JobConfig, dataset, seed: int) -> "data_lib.Sampler":
    return data_lib.Sampler(len(dataset.train_y), config.data.global_batch_size, seed)

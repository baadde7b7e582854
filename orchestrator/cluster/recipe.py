"""Config -> engine objects, shared by every worker (and by tests that train in one process).

Everything a worker builds is a pure function of the job config, so M workers that
each call these functions hold identical models, datasets and samplers. The driver
side (coordinator, supervisor) builds its ``CheckpointManager`` here too, so both see
the same retention settings.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from orchestrator import rules
from orchestrator.checkpoint import bundle, state, structure, warm_start
from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.storage import Storage
from orchestrator.cluster.errors import RestoreError
from orchestrator.config import ConfigError, Dataset, JobConfig, ModelKind
from orchestrator.engine import data as data_lib
from orchestrator.engine import files as files_lib
from orchestrator.engine import models as models_lib
from orchestrator.engine import network as network_lib
from orchestrator.engine import optimizers as optimizers_lib
from orchestrator.engine import plugins as plugins_lib
from orchestrator.engine import transformer as transformer_lib

SYNTHETIC_CLASSES = 10  # data.num_classes null on a synthetic dataset


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


def add_code_paths(config: JobConfig) -> None:
    """Make the job's plug-in modules importable here: the job directory (cwd), and for each
    ``code.paths`` entry the directory holding it (a package's parent, a module's folder)."""
    parents = [os.path.dirname(os.path.abspath(p.rstrip("/"))) for p in config.code.paths]
    plugins_lib.add_import_dirs([os.getcwd(), *parents])


WARM_START_HINT = ("to start a new run from some of its variables, give init_from: {checkpoint: PATH, "
                   "variables: [globs], rename: {checkpoint name: model name}} instead of resume")


def resume_target(config, resume: str | None = None) -> str | None:
    """The checkpoint ``resume: <prefix or directory>`` names, or None for ``auto``/``never``.

    A prefix must have its index; a directory must have a state file naming a committed
    checkpoint. Raises ``RestoreError`` (bad input) otherwise, before anything starts.
    """
    resume = str(config.resume if resume is None else resume)
    if resume in ("auto", "never"):
        return None
    options = checkpoint_options(config)
    storage, path = Storage.for_path(resume, options)
    if storage.exists(bundle.index_filename(path)):
        return _resumable(path, options)
    latest = state.latest_checkpoint(path, storage_options=options) if storage.isdir(path) else None
    if latest is None:
        raise RestoreError(f"resume: no committed checkpoint at {resume!r} "
                           f"(neither {path}.index nor a directory whose 'checkpoint' state file names one)")
    return _resumable(latest, options)


def _resumable(prefix: str, options) -> str:
    """``prefix`` if a job wrote it (its structure record is there: reads the index only)."""
    with CheckpointReader(prefix, options) as reader:
        if not reader.has_tensor(structure.STRUCTURE_KEY):
            raise RestoreError(f"resume: {prefix} has no {structure.STRUCTURE_KEY} record (a job of ours did not "
                               f"write it: TensorFlow or a plain Saver did), so it cannot be resumed; "
                               f"{WARM_START_HINT}")
    return prefix


def warm_start_plan(config: JobConfig, variables, prefix: str | None = None) -> warm_start.WarmStartPlan:
    """What ``init_from`` takes into a model with these ``variables`` (Variables with name, shape,
    dtype), from ``prefix`` (default: ``init_from.checkpoint`` resolved). Raises ``WarmStartError``."""
    cfg = config.init_from
    with warm_start.open_source(prefix or cfg.checkpoint, dict(cfg.storage_options)) as reader:
        model_vars = {v.name: (tuple(v.shape), v.dtype) for v in variables}
        return warm_start.plan(reader, model_vars, list(cfg.variables), dict(cfg.rename))


def load_data(config: JobConfig) -> "data_lib.Dataset":
    """The job's dataset: a data plug-in, files, or a built-in set (see the ``data`` config keys)."""
    cfg = config.data
    if cfg.factory:
        loaded = plugins_lib.call_data_factory(cfg.factory, cfg.args, config.seed)
        return data_lib.from_arrays(*_factory_splits(loaded, cfg.factory), cfg.num_classes,
                                    cfg.factory, ("data.factory", "data.factory"))
    if cfg.format:
        return files_lib.load_files(file_source(config))
    opts: dict[str, Any] = {}
    if cfg.dataset is Dataset.SYNTHETIC:
        opts = {"num_examples": cfg.num_examples, "input_dim": cfg.input_dim,
                "num_classes": cfg.num_classes or SYNTHETIC_CLASSES, "seed": config.seed}
    if cfg.dataset is Dataset.CHARS:
        opts = {"context": cfg.context, **({} if cfg.eval_fraction is None else {"eval_fraction": cfg.eval_fraction})}
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


def file_source(config: JobConfig) -> "files_lib.FileSource":
    cfg = config.data
    return files_lib.FileSource(
        format=cfg.format.value, path=cfg.path, features=cfg.features, labels=cfg.labels,
        eval_path=cfg.eval_path, eval_fraction=cfg.eval_fraction,
        storage_options=dict(cfg.storage_options), num_classes=cfg.num_classes)


def _factory_splits(loaded: Any, name: str) -> tuple[tuple, tuple | None]:
    """((train_x, train_y), (eval_x, eval_y) or None) from what a data factory returned."""
    if isinstance(loaded, data_lib.Dataset):
        return (loaded.train_x, loaded.train_y), (loaded.test_x, loaded.test_y)
    if isinstance(loaded, dict):
        loaded = tuple(loaded.get(k) for k in ("train_x", "train_y", "eval_x", "eval_y"))
    if isinstance(loaded, (tuple, list)) and len(loaded) == 2 and loaded[0] is not None:
        loaded = (*loaded, None, None)
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 4 or loaded[0] is None or loaded[1] is None:
        raise plugins_lib.PluginError(
            f"{name} must return (train_x, train_y, eval_x, eval_y) (eval may be None), "
            f"a dict with those keys, or a Dataset; got {type(loaded).__name__}", "data.factory")
    test = None if loaded[2] is None else (loaded[2], loaded[3])
    return (loaded[0], loaded[1]), test


def num_classes(config: JobConfig, dataset) -> int | None:
    """Classes of the job (None for regression targets)."""
    if config.data.num_classes:
        return int(config.data.num_classes)
    if config.data.dataset is Dataset.SYNTHETIC and not (config.data.format or config.data.factory):
        return SYNTHETIC_CLASSES
    return dataset.num_classes


def model_spec(config: JobConfig, dataset) -> Any:
    """What the job trains: a built-in ``ModelSpec``, a layer-library spec (``SequentialSpec``,
    ``TransformerSpec``) or a plug-in's ``PluginSpec``. A spec the data cannot feed raises
    ``PluginError`` at the model key at fault."""
    cfg = config.model
    if cfg.factory:
        return plugins_lib.PluginSpec(cfg.factory, dict(cfg.args), dataset.input_shape,
                                      num_classes(config, dataset))
    _check_classifier(cfg.kind.value, dataset)
    try:
        if cfg.kind is ModelKind.SEQUENTIAL:
            return _sequential_spec(config, dataset)
        if cfg.kind is ModelKind.TRANSFORMER:
            return _transformer_spec(config, dataset)
    except models_lib.ModelSpecError as exc:
        raise model_error(config, exc) from None
    _check_flat(cfg.kind.value, dataset)
    return models_lib.ModelSpec(
        kind=cfg.kind.value,
        input_dim=int(dataset.train_x.shape[1]),
        hidden=tuple(int(h) for h in cfg.hidden) if cfg.kind is ModelKind.MLP else (),
        num_classes=num_classes(config, dataset),
        activation=cfg.activation.value,
        keep_prob_input=float(cfg.keep_prob_input),
        keep_prob_hidden=float(cfg.keep_prob_hidden),
    )


def build_model(config: JobConfig, dataset, backend: Any) -> Any:
    """The job's model on ``backend`` with the job's seed; a layer list that does not build
    (shapes that do not chain) raises ``PluginError`` at the model key at fault."""
    spec = model_spec(config, dataset)
    try:
        return models_lib.build_model(spec, backend, int(config.seed))
    except models_lib.ModelSpecError as exc:
        raise model_error(config, exc) from None


def model_error(config: JobConfig, exc: Exception) -> "plugins_lib.PluginError":
    """``exc`` (a ``ModelSpecError``) as a ``PluginError`` whose key is the model key it names."""
    where = re.match(r"\w*", str(exc)).group()      # "layers[2].filters: ..." -> layers
    key = f"model.{where}" if where in type(config.model).model_fields else "model.kind"
    return plugins_lib.PluginError(f"model: {exc}", key)


def _sequential_spec(config: JobConfig, dataset) -> "network_lib.SequentialSpec":
    """The layer list of ``model`` on examples of ``model.input_shape`` (the data's by default)."""
    shape = tuple(config.model.input_shape or dataset.input_shape)
    if int(np.prod(shape)) != int(np.prod(dataset.input_shape)):
        raise plugins_lib.PluginError(
            f"model.input_shape {list(shape)} holds {int(np.prod(shape))} values; the data's examples hold "
            f"{int(np.prod(dataset.input_shape))} ({list(dataset.input_shape)})", "model.input_shape")
    return network_lib.SequentialSpec(input_shape=shape, num_classes=num_classes(config, dataset),
                                      layers=config.model.layers)


def _transformer_spec(config: JobConfig, dataset) -> "transformer_lib.TransformerSpec":
    """The transformer of ``model``; vocab and context default to (and must fit) the data's."""
    cfg = config.model
    if dataset.train_x.ndim != 2 or not np.issubdtype(dataset.train_x.dtype, np.integer):
        raise plugins_lib.PluginError(
            f"model.kind transformer needs token ids of shape [N, positions], got {dataset.train_x.dtype} "
            f"features of shape [N, {', '.join(map(str, dataset.input_shape))}] (use dataset: chars)", "model.kind")
    positions, classes = int(dataset.train_x.shape[1]), num_classes(config, dataset)
    if cfg.context is not None and cfg.context != positions:
        raise plugins_lib.PluginError(f"model.context {cfg.context} differs from the data's {positions} "
                                      f"positions per example (chars: data.context)", "model.context")
    if cfg.vocab is not None and cfg.vocab < classes:
        raise plugins_lib.PluginError(f"model.vocab {cfg.vocab} is smaller than the data's {classes} tokens",
                                      "model.vocab")
    optional = {"layers": cfg.layers, "ff_dim": cfg.ff_dim,
                "activation": cfg.activation.value if "activation" in cfg.model_fields_set else None}
    return transformer_lib.TransformerSpec(
        vocab=cfg.vocab or classes, context=positions, d_model=cfg.d_model, heads=cfg.heads, dropout=cfg.dropout,
        **{key: value for key, value in optional.items() if value is not None})


def _check_classifier(kind: str, dataset) -> None:
    if dataset.is_regression:
        raise plugins_lib.PluginError(
            f"model.kind {kind} is a classifier but the labels are floating point (regression): "
            f"use integer class labels or a plug-in model (model.factory)", "model.kind")


def _check_flat(kind: str, dataset) -> None:
    if dataset.train_x.ndim != 2:
        raise plugins_lib.PluginError(
            f"model.kind {kind} needs features of shape [N, D], got [N, "
            f"{', '.join(map(str, dataset.input_shape))}]: flatten them or use a plug-in model "
            f"(model.factory)", "model.kind")


def make_optimizer(config: JobConfig):
    """The built-in optimizer of ``optimizer.name``, or the plug-in of ``optimizer.factory``."""
    cfg = config.optimizer
    if cfg.factory:
        return plugins_lib.build_plugin_optimizer(cfg.factory, cfg.args, cfg.learning_rate)
    hyper = {field: getattr(cfg, field) for field in optimizers_lib.SHARED_HYPER}  # each rule uses its own
    return optimizers_lib.make_optimizer(cfg.name.value, cfg.learning_rate, **hyper)


def rank_data(data, rank: int, num_workers: int) -> "data_lib.Dataset":
    """What worker ``rank`` trains on: the shared dataset, or only its shards of a ``ShardPlan``."""
    if isinstance(data, files_lib.ShardPlan):
        return data.load_rank(rank, num_workers)
    return data


def make_sampler(config: JobConfig, dataset, seed: int) -> "data_lib.Sampler":
    if isinstance(dataset, files_lib.ShardView):
        return data_lib.RankSampler(len(dataset.train_y), config.data.global_batch_size, seed,
                                    dataset.rank, dataset.num_workers)
    return data_lib.Sampler(len(dataset.train_y), config.data.global_batch_size, seed)

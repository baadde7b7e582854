"""Rebuild a ready-to-run model from a checkpoint, without the user's training code.

    model = load_model("runs/x/checkpoints")            # latest checkpoint of a directory
    model = load_model("s3://b/ckpt/model.ckpt-300", storage_options={...})
    model = load_model("model.safetensors")             # a file `orchestrator export` wrote
    scores = model.logits(None, x)
    model = load_model("runs/fm/checkpoints", factory="factorization:build")   # a plug-in model

The checkpoint's structure record (``_MODEL_STRUCTURE``, JSON parsed with
``json`` only: nothing is unpickled or executed) gives the model spec (any kind, see
``specs.spec_from_dict``) and the
parameter names; the parameters are read by name (range reads) and assigned.

A plug-in model's record names its factory (``my_models:build``) and arguments. Loading
never imports code because a checkpoint names it: the caller passes ``factory=`` (the
``module:callable`` name to import, or the callable itself), and the model is rebuilt
with the recorded arguments, input shape and classes.
``model_structure_tensors`` is the writing side: the tensor to add to a save.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from orchestrator.checkpoint.errors import CheckpointError
from orchestrator.checkpoint.safetensors_file import is_safetensors, open_tensors
from orchestrator.checkpoint.structure import read_structure, structure_tensors
from orchestrator.engine.backend import get_backend
from orchestrator.engine import plugins
from orchestrator.engine.models import Model, ModelSpecError, build_model
from orchestrator.engine.specs import spec_from_dict
from orchestrator.errors import BadInputError


class ModelLoadError(CheckpointError, BadInputError, ValueError):
    """The checkpoint has no usable model structure, or its tensors do not fit it."""


def model_structure_tensors(model: Model) -> dict[str, np.ndarray]:
    """``{"_MODEL_STRUCTURE": tensor}`` describing a built-in ``model``, to merge into a save."""
    return structure_tensors(model.spec.to_dict(), model.param_names)


def load_model(path: str, storage_options: Mapping[str, Any] | None = None,
               device: str = "cpu", factory: str | Callable | None = None) -> Any:
    """The model saved at ``path``: a checkpoint (a prefix, or a directory's latest) or a
    ``.safetensors`` file that ``export`` wrote.

    ``factory``: for a plug-in model, the factory to rebuild it with (see the module docstring).
    """
    reader = open_tensors(path, storage_options)
    where = getattr(reader, "prefix", path)
    record = read_structure(reader)
    if record is None:
        raise ModelLoadError(_no_structure_message(where, is_safetensors(path)))
    model = _build(record["spec"], get_backend(device), factory, where)
    _check_names(model, record["variables"], where)
    values = _read_parameters(reader, model, where)
    for variable in model.variables:
        variable.assign(values[variable.name])
    return model


def _no_structure_message(where: str, exported: bool) -> str:
    if exported:
        return (f"{where}: the file has no model structure record (its __metadata__ has no 'structure'): it was "
                f"exported from a checkpoint without one. Read its tensors with "
                f"orchestrator.checkpoint.open_tensors, or re-export a checkpoint saved with "
                f"Saver(var_list, structure=model)")
    return (f"{where}: checkpoint has no model structure record (_MODEL_STRUCTURE): it holds tensors but not "
            f"which model they belong to. Restore it into your variables with a Saver, or save it with "
            f"Saver(var_list, structure=model) so load_model can rebuild the model")


def _build(spec: Mapping[str, Any], backend: Any, factory: str | Callable | None, where: str) -> Any:
    if plugins.is_plugin_record(spec):
        return _build_plugin(spec, backend, factory, where)
    try:
        return build_model(spec_from_dict(spec), backend, seed=0)
    except ModelSpecError as exc:
        raise ModelLoadError(f"{where}: bad model spec in the structure record: {exc}") from exc


def _build_plugin(spec: Mapping[str, Any], backend: Any, factory: str | Callable | None, where: str) -> Any:
    """The plug-in model, built by the factory the caller names (never one the checkpoint names)."""
    try:
        plugin = plugins.PluginSpec.from_dict(spec)
        if factory is None:
            raise ModelLoadError(
                f"{where}: holds a plug-in model built by {plugin.factory} with args {plugin.args}; "
                f"load_model never imports code because a checkpoint names it: pass "
                f"factory={plugin.factory!r} (or the callable) to rebuild it")
        build = plugins.import_callable(factory, "factory") if isinstance(factory, str) else factory
        return plugins.build_plugin_model(plugin, backend, seed=0, factory=build)
    except plugins.PluginError as exc:
        raise ModelLoadError(f"{where}: cannot rebuild the plug-in model: {exc}") from exc


def _names(model: Any) -> list[str]:
    return [v.name for v in model.variables]


def _check_names(model: Any, names: list[str], where: str) -> None:
    if list(names) != _names(model):
        raise ModelLoadError(f"{where}: structure record lists variables {list(names)}, "
                             f"but spec builds {_names(model)}")


def _read_parameters(reader: Any, model: Any, where: str) -> dict[str, np.ndarray]:
    """Every parameter, read in one batch, each checked against the shape the spec builds."""
    for name in _names(model):
        if not reader.has_tensor(name):
            raise ModelLoadError(f"{where}: parameter tensor {name!r} is missing")
    values = reader.get_tensors(_names(model))
    shapes = {v.name: v.shape for v in model.variables}
    for name, value in values.items():
        if tuple(value.shape) != shapes[name]:
            raise ModelLoadError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, "
                                 f"spec needs {shapes[name]}")
        if not np.issubdtype(value.dtype, np.floating):
            raise ModelLoadError(f"{where}: tensor {name!r} has dtype {value.dtype}, expected floating point")
    return values

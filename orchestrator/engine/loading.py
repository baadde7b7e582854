"""Rebuild a ready-to-run model from a checkpoint, without the user's training code.

    model = load_model("runs/x/checkpoints")            # latest checkpoint of a directory
    model = load_model("s3://b/ckpt/model.ckpt-300", storage_options={...})
    scores = model.logits(None, x)

The checkpoint's structure record (``_MODEL_STRUCTURE``, JSON parsed with
``json`` only: nothing is unpickled or executed) gives the ``ModelSpec`` and the
parameter names; the parameters are read by name (range reads) and assigned.
``model_structure_tensors`` is the writing side: the tensor to add to a save.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from orchestrator.checkpoint.errors import CheckpointError
from orchestrator.checkpoint.reader import load_checkpoint
from orchestrator.checkpoint.structure import read_structure, structure_tensors
from orchestrator.engine.backend import get_backend
from orchestrator.engine.models import Model, ModelSpec, ModelSpecError, build_model


class ModelLoadError(CheckpointError, ValueError):
    """The checkpoint has no usable model structure, or its tensors do not fit it."""


def model_structure_tensors(model: Model) -> dict[str, np.ndarray]:
    """``{"_MODEL_STRUCTURE": tensor}`` describing ``model``, to merge into a save."""
    return structure_tensors(model.spec.to_dict(), model.param_names)


def load_model(path: str, storage_options: Mapping[str, Any] | None = None,
               device: str = "cpu") -> Model:
    """The model saved in the checkpoint at ``path`` (a prefix, or a directory's latest)."""
    reader = load_checkpoint(path, storage_options)
    where = getattr(reader, "prefix", path)
    record = read_structure(reader)
    if record is None:
        raise ModelLoadError(f"{where}: checkpoint has no model structure record (_MODEL_STRUCTURE); "
                             f"it was not written by orchestrator, restore it with a Saver instead")
    try:
        spec = ModelSpec.from_dict(record["spec"])
    except ModelSpecError as exc:
        raise ModelLoadError(f"{where}: bad model spec in the structure record: {exc}") from exc
    model = build_model(spec, get_backend(device), seed=0)
    _check_names(model, record["variables"], where)
    model.assign({name: _read_parameter(reader, model, name, where) for name in model.param_names})
    return model


def _check_names(model: Model, names: list[str], where: str) -> None:
    if list(names) != model.param_names:
        raise ModelLoadError(f"{where}: structure record lists variables {list(names)}, "
                             f"but spec builds {model.param_names}")


def _read_parameter(reader: Any, model: Model, name: str, where: str) -> np.ndarray:
    if not reader.has_tensor(name):
        raise ModelLoadError(f"{where}: parameter tensor {name!r} is missing")
    value = reader.get_tensor(name)
    expected = next(v.shape for v in model.variables if v.name == name)
    if tuple(value.shape) != expected:
        raise ModelLoadError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, spec needs {expected}")
    if not np.issubdtype(value.dtype, np.floating):
        raise ModelLoadError(f"{where}: tensor {name!r} has dtype {value.dtype}, expected floating point")
    return value

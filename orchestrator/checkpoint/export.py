"""Export a checkpoint's model as one self-contained ``.safetensors`` file.

What TF's frozen-graph export gave: weights plus structure, no optimizer state.
With a structure record (written by the runtime, or by ``Saver(..., structure=model)``)
only the tensors it lists as the model's ``variables`` are written (no optimizer
slots, no ``global_step``), and the record goes into the safetensors metadata under
``"structure"``, so ``load_model("model.safetensors")`` rebuilds the model.

Without a record the export still writes every tensor safetensors can hold and says
what is missing (``Exported.notes``): nothing tells parameters from optimizer state,
and ``load_model`` cannot rebuild a model from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from orchestrator.checkpoint import reader
from orchestrator.checkpoint.errors import CheckpointError
from orchestrator.checkpoint.safetensors_file import METADATA_STRUCTURE, dtype_code, encode_safetensors
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.structure import STRUCTURE_FORMAT, STRUCTURE_KEY, read_structure
from orchestrator.errors import BadInputError

__all__ = ["ExportError", "Exported", "encode_safetensors", "export_checkpoint", "export_safetensors"]


class ExportError(CheckpointError, BadInputError, ValueError):
    """The checkpoint cannot be exported (a model tensor is missing or has no safetensors dtype)."""


@dataclass
class Exported:
    """What an export wrote: the file, the tensors in it, and what the operator should know."""

    path: str
    tensors: list[str]
    nbytes: int
    has_structure: bool
    notes: list[str] = field(default_factory=list)


def model_tensors(ckpt: "reader.CheckpointReader", record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The model's parameter tensors named by the structure record."""
    missing = [n for n in record["variables"] if not ckpt.has_tensor(n)]
    if missing:
        raise ExportError(f"{ckpt_prefix(ckpt)}: structure lists variables missing from the checkpoint: {missing}")
    unsupported = [n for n in record["variables"] if dtype_code(ckpt.get_variable_to_dtype_map()[n]) is None]
    if unsupported:
        raise ExportError(f"{ckpt_prefix(ckpt)}: model tensor(s) {unsupported} have no safetensors dtype")
    return {name: np.asarray(value) for name, value in ckpt.get_tensors(record["variables"]).items()}


def all_tensors(ckpt: "reader.CheckpointReader") -> tuple[dict[str, np.ndarray], list[str]]:
    """Every tensor safetensors can hold, and the names of those it cannot (strings, complex)."""
    dtypes = ckpt.get_variable_to_dtype_map()
    names = [n for n in ckpt.keys() if n != STRUCTURE_KEY]
    kept = [n for n in names if dtype_code(dtypes[n]) is not None]
    return ckpt.get_tensors(kept), [n for n in names if n not in kept]


def ckpt_prefix(ckpt: Any) -> str:
    return str(getattr(ckpt, "prefix", "<checkpoint>"))


def _without_structure(ckpt: Any) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    tensors, skipped = all_tensors(ckpt)
    notes = [f"{ckpt_prefix(ckpt)} has no model structure record ({STRUCTURE_KEY}): exported all {len(tensors)} "
             f"tensors it holds, optimizer slots and counters included if there are any; load_model cannot "
             f"rebuild a model from this file. Save with Saver(var_list, structure=model) to record the structure"]
    if skipped:
        notes.append(f"skipped {len(skipped)} tensor(s) safetensors cannot hold (strings, complex): {skipped}")
    return tensors, {}, notes


def export_checkpoint(prefix: str, out_path: str, storage_options: Mapping | None = None) -> Exported:
    """Write ``out_path`` from checkpoint ``prefix`` (or its directory's latest).

    ``storage_options`` apply to the checkpoint, and to ``out_path`` only when it is a
    URL of the same protocol (exporting from S3 to a local file is the common case).
    Nothing is written when a model tensor cannot be exported.
    """
    ckpt = reader.load_checkpoint(prefix, storage_options=storage_options)
    record = read_structure(ckpt)
    if record is None:
        tensors, metadata, notes = _without_structure(ckpt)
    else:
        tensors, notes = model_tensors(ckpt, record), []
        metadata = {"format": STRUCTURE_FORMAT, METADATA_STRUCTURE: json.dumps(record, sort_keys=True)}
    payload = encode_safetensors(tensors, metadata)
    same_store = "://" in out_path and out_path.split("://")[0] == prefix.split("://")[0]
    storage, path = Storage.for_path(out_path, storage_options if same_store else None)
    try:
        storage.write_bytes(path, payload)
    except (FileExistsError, NotADirectoryError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        # the output path is the caller's input (e.g. a file where its directory should be): not a failure of ours
        raise ExportError(f"cannot write {out_path}: {type(exc).__name__}: {exc}") from None
    return Exported(path, sorted(tensors), len(payload), record is not None, notes)


def export_safetensors(prefix: str, out_path: str, storage_options: Mapping | None = None) -> str:
    """``export_checkpoint`` returning only the path written."""
    return export_checkpoint(prefix, out_path, storage_options).path

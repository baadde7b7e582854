"""Export a checkpoint's model as one self-contained ``.safetensors`` file.

What TF's frozen-graph export gave: weights plus structure, no optimizer state.
Only the tensors the structure record lists as the model's ``variables`` are
written (no optimizer slots, no ``global_step``); the record itself goes into the
safetensors metadata under ``"structure"``.

The format is written here by hand: an 8-byte little-endian header length, a JSON
header (``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``, padded with
spaces to a multiple of 8 bytes), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import numpy as np

from orchestrator.checkpoint import reader
from orchestrator.checkpoint.errors import CheckpointError
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.structure import STRUCTURE_FORMAT, read_structure

_ALIGN = 8
_DTYPES = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64", np.dtype("uint32"): "U32", np.dtype("uint16"): "U16", np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}


class ExportError(CheckpointError, ValueError):
    """The checkpoint cannot be exported (no structure record, unsupported dtype, ...)."""


def safetensors_dtype(dtype: np.dtype, name: str) -> str:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "BF16"
    if dtype not in _DTYPES:
        raise ExportError(f"tensor {name!r}: dtype {dtype} has no safetensors equivalent")
    return _DTYPES[dtype]


def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The whole file as bytes; tensors laid out in name order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name])
        raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": safetensors_dtype(data.dtype, name), "shape": list(data.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def model_tensors(ckpt: "reader.CheckpointReader", record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The model's parameter tensors named by the structure record."""
    missing = [n for n in record["variables"] if not ckpt.has_tensor(n)]
    if missing:
        raise ExportError(f"{ckpt_prefix(ckpt)}: structure lists variables missing from the checkpoint: {missing}")
    return {name: np.asarray(value) for name, value in ckpt.get_tensors(record["variables"]).items()}


def ckpt_prefix(ckpt: Any) -> str:
    return str(getattr(ckpt, "prefix", "<checkpoint>"))


def export_safetensors(prefix: str, out_path: str, storage_options: Mapping | None = None) -> str:
    """Write ``out_path`` from checkpoint ``prefix`` (or its directory's latest); returns the path.

    ``storage_options`` apply to the checkpoint, and to ``out_path`` only when it is a
    URL of the same protocol (exporting from S3 to a local file is the common case).
    """
    ckpt = reader.load_checkpoint(prefix, storage_options=storage_options)
    record = read_structure(ckpt)
    if record is None:
        raise ExportError(f"{ckpt_prefix(ckpt)} has no model structure record; cannot tell model "
                          f"parameters from optimizer state")
    metadata = {"format": STRUCTURE_FORMAT, "structure": json.dumps(record, sort_keys=True)}
    payload = encode_safetensors(model_tensors(ckpt, record), metadata)
    same_store = "://" in out_path and out_path.split("://")[0] == prefix.split("://")[0]
    storage, path = Storage.for_path(out_path, storage_options if same_store else None)
    storage.write_bytes(path, payload)
    return path

"""The model structure record: what TF kept in ``.meta``, as plain JSON.

A checkpoint may carry one DT_STRING scalar tensor, ``_MODEL_STRUCTURE``, holding
``{"format": "orchestrator.model/1", "spec": {...}, "variables": [names]}``.
``spec`` is the engine's ``ModelSpec.to_dict()``; ``variables`` lists the model's
parameter tensors (no optimizer slots, no counters), which is what ``load_model``
assigns and ``export`` writes. The record is parsed with ``json`` only: loading a
checkpoint never executes code.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint.errors import CorruptCheckpointError, UnsupportedVersionError
from orchestrator.errors import InvalidArgumentError

STRUCTURE_KEY = "_MODEL_STRUCTURE"
STRUCTURE_FORMAT = "orchestrator.model/1"


def make_record(spec: Mapping[str, Any], variables: Sequence[str]) -> dict:
    """The record as a dict; ``spec`` must be JSON-serializable."""
    names = [str(v) for v in variables]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"duplicate variable names in the structure record: {names}")
    return {"format": STRUCTURE_FORMAT, "spec": dict(spec), "variables": names}


def encode_structure(spec: Mapping[str, Any], variables: Sequence[str]) -> np.ndarray:
    """The record as the 0-d DT_STRING tensor to save under ``STRUCTURE_KEY``."""
    text = json.dumps(make_record(spec, variables), sort_keys=True, separators=(",", ":"))
    return np.array(text.encode("utf-8"), dtype=object)


def structure_tensors(spec: Mapping[str, Any], variables: Sequence[str]) -> dict[str, np.ndarray]:
    """``{STRUCTURE_KEY: tensor}``, ready to merge into the tensors of a save."""
    return {STRUCTURE_KEY: encode_structure(spec, variables)}


def record_for(structure: Any) -> dict:
    """The record for what ``Saver(..., structure=...)`` takes: a model (anything with
    ``spec.to_dict()`` and ``param_names``, e.g. what ``build_model`` returns) or a mapping
    ``{"spec": {...}, "variables": [names]}``."""
    if isinstance(structure, Mapping):
        unknown = sorted(set(structure) - {"spec", "variables", "format"})
        if unknown or "spec" not in structure or "variables" not in structure:
            raise InvalidArgumentError(f"structure mapping needs exactly 'spec' and 'variables', got keys {sorted(structure)}")
        return validate_record(make_record(structure["spec"], structure["variables"]), "structure")
    spec, names = getattr(structure, "spec", None), getattr(structure, "param_names", None)
    if not hasattr(spec, "to_dict") or names is None:
        raise InvalidArgumentError(f"structure must be a model (with .spec and .param_names) or a mapping "
                        f"{{'spec': ..., 'variables': [...]}}, got {type(structure).__name__}")
    return make_record(spec.to_dict(), names)


def record_tensors(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{STRUCTURE_KEY: tensor}`` for a record ``make_record`` or ``record_for`` built."""
    return structure_tensors(record["spec"], record["variables"])


def decode_structure(value: Any, where: str = STRUCTURE_KEY) -> dict:
    """Parse and validate a record from the tensor value (bytes, str or 0-d array)."""
    raw = _scalar_bytes(value, where)
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise CorruptCheckpointError(f"{where}: model structure is not valid JSON: {e}") from None
    return validate_record(record, where)


def validate_record(record: Any, where: str = STRUCTURE_KEY) -> dict:
    if not isinstance(record, dict):
        raise CorruptCheckpointError(f"{where}: model structure must be a JSON object")
    if record.get("format") != STRUCTURE_FORMAT:
        raise UnsupportedVersionError(
            f"{where}: model structure format {record.get('format')!r}, expected {STRUCTURE_FORMAT!r}"
        )
    if not isinstance(record.get("spec"), dict):
        raise CorruptCheckpointError(f"{where}: model structure 'spec' must be a JSON object")
    names = record.get("variables")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CorruptCheckpointError(f"{where}: model structure 'variables' must be a list of names")
    return record


def read_structure(reader: Any) -> dict | None:
    """The record of the checkpoint ``reader`` reads, or None if it has none."""
    if not reader.has_tensor(STRUCTURE_KEY):
        return None
    where = f"{getattr(reader, 'prefix', '<checkpoint>')}:{STRUCTURE_KEY}"
    return decode_structure(reader.get_tensor(STRUCTURE_KEY), where)


def _scalar_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise CorruptCheckpointError(f"{where}: model structure must be a scalar, shape {value.shape}")
        value = value.reshape(()).item()
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise CorruptCheckpointError(f"{where}: model structure must be a string tensor, got {type(value).__name__}")

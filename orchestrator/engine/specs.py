"""One entry point from a structure record's ``spec`` to a spec object, whatever its kind.

``spec_from_dict`` dispatches on ``kind``: ``mlp``/``softmax`` -> ``models.ModelSpec``,
``sequential`` -> ``network.SequentialSpec``, ``transformer`` -> ``transformer.TransformerSpec``.
Every spec has ``to_dict()`` (JSON for the checkpoint) and is built by ``models.build_model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.engine.models import ModelSpec, ModelSpecError
from orchestrator.engine.network import SequentialSpec
from orchestrator.engine.transformer import TransformerSpec

SPEC_CLASSES = {"mlp": ModelSpec, "softmax": ModelSpec, "sequential": SequentialSpec,
                "transformer": TransformerSpec}


def spec_from_dict(record: Mapping[str, Any]) -> Any:
    """The spec a record describes (``kind`` absent means the MLP, as records before layers did)."""
    if not isinstance(record, Mapping):
        raise ModelSpecError(f"model spec must be a mapping, got {type(record).__name__}")
    kind = record.get("kind", "mlp")
    if kind not in SPEC_CLASSES:
        raise ModelSpecError(f"kind must be one of {sorted(SPEC_CLASSES)}, got {kind!r}")
    return SPEC_CLASSES[kind].from_dict(record)

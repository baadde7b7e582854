"""Models made of layers: ``kind: sequential`` (a list of layers from YAML) and the runtime protocol.

    spec = SequentialSpec(input_shape=(8, 8, 1), num_classes=10, layers=[
        {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"type": "max_pooling2d"}, {"type": "flatten"}, {"type": "dense"}])   # last dense: num_classes
    model = spec.build(backend, seed)          # or models.build_model(spec, backend, seed)
    loss_sum, correct, grads = model.loss_and_grads(params, x, y, step=s, example_offset=o,
                                                    global_batch_size=G, seed=seed)

``Network`` implements the same protocol as the MLP (``models.Model``): grads are the
slice's sums divided by G, dropout masks are drawn per global example index, so the
workers' grads added in rank order are the full batch's. The loss is softmax
cross-entropy on the last axis: per example for [B, C] logits (labels [B]), per token
for [B, T, C] logits (labels [B, T]; an example's loss is the mean over its T tokens,
``num_correct`` counts an example's correct tokens / T, a float).

Input data whose examples hold as many values as ``input_shape`` but another shape (the
64 pixels of digits for an [8, 8, 1] CNN) is reshaped, without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from orchestrator.engine.backend import Backend
from orchestrator.engine.layers import Builder, LayerSpecError, Pass, backward_chain, build_chain, forward_chain
from orchestrator.engine.layers import parse_layers
from orchestrator.engine.models import ModelSpecError
from orchestrator.errors import InvalidArgumentError

EVAL_BATCH = 256


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ModelSpecError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def spec_fields_from_dict(cls, record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` without its ``kind``, checked for unknown keys (named) against ``cls``'s fields."""
    if not isinstance(record, Mapping):
        raise ModelSpecError(f"model spec must be a mapping, got {type(record).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ModelSpecError(f"unknown model spec key(s) {unknown}; expected a subset of {sorted(known)}")
    return {k: v for k, v in record.items() if k != "kind"}


@dataclass(frozen=True)
class SequentialSpec:
    """Layers applied in order to examples of ``input_shape``; the output holds ``num_classes`` logits.

    ``layers`` is kept canonical (every option written out), which is what the checkpoint's
    structure record stores, so a rebuilt model never depends on today's defaults. A final
    ``dense`` layer without ``units`` gets ``num_classes``.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    layers: tuple[dict, ...]
    kind: str = "sequential"

    def __post_init__(self) -> None:
        if self.kind != "sequential":
            raise ModelSpecError(f"kind must be 'sequential', got {self.kind!r}")
        if not isinstance(self.input_shape, (list, tuple)) or not self.input_shape:
            raise ModelSpecError(f"input_shape must be a non-empty list of positive integers, got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", tuple(_positive("input_shape", d) for d in self.input_shape))
        object.__setattr__(self, "num_classes", _positive("num_classes", self.num_classes))
        if self.num_classes < 2:
            raise ModelSpecError(f"num_classes must be >= 2, got {self.num_classes}")
        raw = [dict(layer) if isinstance(layer, Mapping) else layer for layer in (self.layers or [])]
        if raw and isinstance(raw[-1], dict) and raw[-1].get("type") == "dense" and "units" not in raw[-1]:
            raw[-1]["units"] = self.num_classes
        object.__setattr__(self, "layers", tuple(layer.to_config() for layer in parse_layers(raw, "layers")))

    def layer_configs(self) -> list[dict]:
        return [dict(layer) for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "layers": self.layer_configs()}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "SequentialSpec":
        values = spec_fields_from_dict(cls, record)
        missing = sorted({"input_shape", "num_classes", "layers"} - set(values))
        if missing:
            raise ModelSpecError(f"sequential model spec lacks {missing}")
        return cls(**values)

    def build(self, backend: Backend, seed: int) -> "Network":
        return Network(self, backend, seed)


class Network:
    """The layers of a spec, their Variables, and the training protocol on them."""

    def __init__(self, spec: Any, backend: Backend, seed: int):
        self.spec, self.backend = spec, backend
        self.layers = parse_layers(spec.layer_configs(), "layers")
        for index, layer in enumerate(self.layers[1:], start=1):
            if layer.integer_input:
                raise LayerSpecError(f"layers[{index}] ({layer.type}): takes token ids, so it must be the first layer")
        builder = Builder(backend, seed)
        output = build_chain(self.layers, builder, tuple(spec.input_shape))
        if output[-1] != spec.num_classes or len(output) > 2:
            raise LayerSpecError(f"the last layer outputs {list(output)} per example; the loss needs "
                                 f"[{spec.num_classes}] (classes) or [positions, {spec.num_classes}] (per token)")
        self.output_shape = output
        self.variables = builder.variables
        self.integer_input = self.layers[0].integer_input

    @property
    def param_names(self) -> list[str]:
        return [v.name for v in self.variables]

    def params(self) -> dict[str, Any]:
        """name -> current array (not a copy)."""
        return {v.name: v.value for v in self.variables}

    def assign(self, values: Mapping[str, Any]) -> None:
        """Set parameters by name; every parameter must be given."""
        missing = [name for name in self.param_names if name not in values]
        if missing:
            raise ModelSpecError(f"no value for model parameter(s) {missing}")
        for variable in self.variables:
            variable.assign(values[variable.name])

    # ----------------------------------------------------------------- protocol
    def loss_and_grads(self, params: Mapping[str, Any], x: Any, y: Any, *, step: int, example_offset: int,
                       global_batch_size: int, seed: int, train: bool = True,
                       reuse_buffers: bool = False) -> tuple[float, Any, dict[str, Any]]:
        """(loss summed over the slice's examples, number correct, grads summed / global_batch_size)."""
        x, y = self._inputs(params, x, y)
        run = Pass(self.backend.xp, self.backend.ops, train, step, seed, example_offset)
        logits, caches = forward_chain(self.layers, params, x, run)
        loss_sum, correct, dlogits = self._loss(logits, y, 1.0 / global_batch_size)
        backward_chain(self.layers, params, caches, dlogits, run, need_dx=False)
        return loss_sum, correct, {name: run.grads[name] for name in self.param_names}

    def evaluate(self, params: Mapping[str, Any] | None, x: Any, y: Any,
                 batch_size: int = EVAL_BATCH) -> tuple[float, float]:
        """(mean loss per example, accuracy) without dropout, in batches of ``batch_size``."""
        params = self.params() if params is None else params
        loss_sum, correct = 0.0, 0.0
        for start in range(0, len(y), batch_size):
            logits = self.logits(params, x[start:start + batch_size])
            labels = self.backend.xp.asarray(y[start:start + batch_size], dtype=np.int64)
            batch_loss, batch_correct, _ = self._loss(logits, labels, 0.0)
            loss_sum += batch_loss
            correct += batch_correct
        return loss_sum / len(y), correct / len(y)

    def logits(self, params: Mapping[str, Any] | None, x: Any) -> Any:
        """Scores without dropout: [B, C], or [B, T, C] for a per-token model."""
        params = self.params() if params is None else params
        x, _ = self._inputs(params, x, None)
        return forward_chain(self.layers, params, x, Pass(self.backend.xp, self.backend.ops, train=False))[0]

    # ----------------------------------------------------------------- internals
    def _inputs(self, params: Mapping[str, Any], x: Any, y: Any) -> tuple[Any, Any]:
        xp = self.backend.xp
        dtype = np.int64 if self.integer_input else params[self.param_names[0]].dtype
        x = xp.asarray(x, dtype=dtype)
        shape = tuple(self.spec.input_shape)
        if x.ndim < 1 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise InvalidArgumentError(f"x must hold examples of shape {list(shape)}, got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], *shape)
        if y is not None:
            y = xp.asarray(y, dtype=np.int64)
            expected = (x.shape[0], *self.output_shape[:-1])
            if tuple(y.shape) != expected:
                raise InvalidArgumentError(f"y must have shape {list(expected)}, got {tuple(y.shape)}")
        return x, y

    def _loss(self, logits: Any, y: Any, grad_scale: float) -> tuple[float, Any, Any]:
        """Softmax cross-entropy; per token (loss and correct averaged over positions) for 3-d logits."""
        softmax_cross_entropy = self.backend.ops.softmax_cross_entropy
        if logits.ndim == 2:
            return softmax_cross_entropy(logits, y, grad_scale)
        batch, positions, classes = logits.shape
        loss, correct, dlogits = softmax_cross_entropy(logits.reshape(batch * positions, classes),
                                                       y.reshape(-1), grad_scale / positions)
        return loss / positions, correct / positions, dlogits.reshape(logits.shape)

"""Models: an MLP built from a ``ModelSpec``, and softmax regression (an MLP without hidden layers).

Parameters are ``Variable``s named as TF1 ``tf.layers.dense`` names them, in
forward order: ``dense/kernel``, ``dense/bias``, ``dense_1/kernel``, ... (float32),
so a checkpoint reads naturally in TensorFlow and a TF1 checkpoint of the same
net warm-starts ours. Kernels start Glorot-uniform, biases zero, each drawn from
``Generator(Philox(SeedSequence([seed, variable index])))``.

Contract used by the runtime:

    loss, correct, grads = model.loss_and_grads(params, x, y, step=s, example_offset=o,
                                                global_batch_size=G, seed=seed)

``grads`` are the SUM over this slice's examples divided by ``G``, so adding the
workers' grads (in rank order) gives the full-batch mean gradient. Dropout masks
are drawn for global example index ``o + i`` (see ``rng``), so any split of the
batch draws the masks one process would. Dropout layer ids: 0 = input,
i = output of hidden layer i.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from orchestrator import rules
from orchestrator.checkpoint.variables import Variable
from orchestrator.engine.backend import Backend
from orchestrator.errors import BadInputError, InvalidArgumentError

KINDS = ("mlp", "softmax")
ACTIVATIONS = ("relu", "gelu")


class ModelSpecError(BadInputError, ValueError):
    """A model spec (or its serialized dict) is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    """What to build. ``softmax`` ignores ``hidden`` and ``keep_prob_hidden`` (normalized away)."""

    kind: str = "mlp"
    input_dim: int = 784
    hidden: tuple[int, ...] = (625, 625)
    num_classes: int = 10
    activation: str = "relu"
    keep_prob_input: float = 0.8
    keep_prob_hidden: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.kind == "softmax":
            object.__setattr__(self, "hidden", ())
            object.__setattr__(self, "keep_prob_hidden", 1.0)
        _validate(self)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.input_dim, *self.hidden, self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (for the checkpoint's structure record)."""
        record = asdict(self)
        record["hidden"] = list(self.hidden)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "ModelSpec":
        """Inverse of ``to_dict``; rejects unknown keys by name."""
        if not isinstance(record, Mapping):
            raise ModelSpecError(f"model spec must be a mapping, got {type(record).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ModelSpecError(f"unknown model spec key(s) {unknown}; expected a subset of {sorted(known)}")
        try:
            return cls(**dict(record))
        except (TypeError, ValueError) as exc:
            raise ModelSpecError(f"invalid model spec {dict(record)!r}: {exc}") from exc


def _validate(spec: ModelSpec) -> None:
    if spec.kind not in KINDS:
        raise ModelSpecError(f"kind must be one of {KINDS}, got {spec.kind!r}")
    if spec.activation not in ACTIVATIONS:
        raise ModelSpecError(f"activation must be one of {ACTIVATIONS}, got {spec.activation!r}")
    for name in ("input_dim", "num_classes"):
        value = getattr(spec, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ModelSpecError(f"{name} must be a positive int, got {value!r}")
    if spec.num_classes < 2:
        raise ModelSpecError(f"num_classes must be >= 2, got {spec.num_classes}")
    if any(h < 1 for h in spec.hidden):
        raise ModelSpecError(f"hidden sizes must be positive, got {list(spec.hidden)}")
    for name in ("keep_prob_input", "keep_prob_hidden"):
        value = getattr(spec, name)
        if not isinstance(value, (int, float)):
            raise ModelSpecError(f"{name} must be a number, got {value!r}")
        rules.PROBABILITY.check(name, value, ModelSpecError)


def dense_name(index: int) -> str:
    """TF1's name for the index-th dense layer: dense, dense_1, dense_2, ..."""
    return "dense" if index == 0 else f"dense_{index}"


def build_model(spec: ModelSpec, backend: Backend, seed: int) -> "Model":
    """A model with deterministic initial weights for ``seed``.

    Layer-library specs (``network.SequentialSpec``, ``transformer.TransformerSpec``) build
    themselves (``spec.build``); see ``specs.spec_from_dict`` for every kind.
    """
    if not isinstance(spec, ModelSpec):
        return spec.build(backend, seed)
    variables = []
    sizes = spec.layer_sizes
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 2 * layer])))
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = generator.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
        bias = np.zeros(fan_out, dtype=np.float32)
        variables.append(Variable(f"{dense_name(layer)}/kernel", backend.asarray(kernel)))
        variables.append(Variable(f"{dense_name(layer)}/bias", backend.asarray(bias)))
    return Model(spec, backend, variables)


class _Buffers:
    """Arrays keyed by role, reused across calls when ``reuse``; otherwise every ``get`` allocates."""

    def __init__(self, xp: Any, reuse: bool):
        self.xp = xp
        self.enabled = reuse
        self._arrays: dict[tuple, Any] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: Any) -> Any:
        if not self.enabled:
            return self.xp.empty(shape, dtype=dtype)
        key = (role, shape, np.dtype(dtype))
        array = self._arrays.get(key)
        if array is None:
            array = self._arrays[key] = self.xp.empty(shape, dtype=dtype)
        return array


@dataclass
class _Forward:
    """Activations kept for the backward pass (per layer: input a, pre-activation z, mask)."""

    inputs: list[Any]
    pre_activations: list[Any]
    masks: list[Any]
    logits: Any


class Model:
    """Forward/backward of ``spec`` on ``backend``; holds its parameters as Variables."""

    def __init__(self, spec: ModelSpec, backend: Backend, variables: list[Variable]):
        self.spec = spec
        self.backend = backend
        self.variables = variables
        self._reused = _Buffers(backend.xp, reuse=True)
        self._fresh = _Buffers(backend.xp, reuse=False)

    @property
    def param_names(self) -> list[str]:
        return [v.name for v in self.variables]

    @property
    def num_layers(self) -> int:
        return len(self.spec.layer_sizes) - 1

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

    # ----------------------------------------------------------------- training
    def loss_and_grads(self, params: Mapping[str, Any], x: Any, y: Any, *, step: int,
                       example_offset: int, global_batch_size: int, seed: int,
                       train: bool = True, reuse_buffers: bool = False
                       ) -> tuple[float, int, dict[str, Any]]:
        """(loss summed over the slice, number correct, grads summed / global_batch_size).

        With ``reuse_buffers`` the returned grads live in arrays owned by the model
        and are overwritten by the next call (what the training loop wants); without
        it they are fresh arrays.
        """
        buffers = self._reused if reuse_buffers else self._fresh
        x, y = self._inputs(params, x, y)
        masks = self._masks(x.shape[0], x.dtype, step, example_offset, seed) if train else None
        forward = self._forward(params, x, masks, buffers)
        loss_sum, correct, dlogits = self.backend.ops.softmax_cross_entropy(
            forward.logits, y, 1.0 / global_batch_size)
        return loss_sum, correct, self._backward(params, forward, dlogits, buffers)

    def evaluate(self, params: Mapping[str, Any] | None, x: Any, y: Any,
                 batch_size: int = 1024) -> tuple[float, float]:
        """(mean loss, accuracy) without dropout, in batches of ``batch_size``."""
        params = self.params() if params is None else params
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), batch_size):
            xb, yb = self._inputs(params, x[start:start + batch_size], y[start:start + batch_size])
            forward = self._forward(params, xb, None, self._reused)   # consumed before the next batch
            batch_loss, batch_correct, _ = self.backend.ops.softmax_cross_entropy(forward.logits, yb, 0.0)
            loss_sum += batch_loss
            correct += batch_correct
        return loss_sum / len(y), correct / len(y)

    def logits(self, params: Mapping[str, Any] | None, x: Any) -> Any:
        """Class scores without dropout (for prediction)."""
        params = self.params() if params is None else params
        x, _ = self._inputs(params, x, None)
        return self._forward(params, x, None, self._fresh).logits

    # ----------------------------------------------------------------- internals
    def _inputs(self, params: Mapping[str, Any], x: Any, y: Any) -> tuple[Any, Any]:
        xp = self.backend.xp
        dtype = params["dense/kernel"].dtype
        x = xp.asarray(x, dtype=dtype)
        if x.ndim != 2 or x.shape[1] != self.spec.input_dim:
            raise InvalidArgumentError(f"x must have shape [batch, {self.spec.input_dim}], got {tuple(x.shape)}")
        return x, (None if y is None else xp.asarray(y, dtype=np.int64))

    def _masks(self, batch: int, dtype: Any, step: int, example_offset: int, seed: int) -> list[Any]:
        """Scaled dropout masks for the input and each hidden layer (None where keep_prob == 1)."""
        keep_probs = [self.spec.keep_prob_input] + [self.spec.keep_prob_hidden] * len(self.spec.hidden)
        sizes = self.spec.layer_sizes[:-1]
        return [None if keep == 1.0 else
                self.backend.ops.dropout_mask(seed, step, layer, example_offset, (batch, size), keep, dtype)
                for layer, (keep, size) in enumerate(zip(keep_probs, sizes))]

    def _forward(self, params: Mapping[str, Any], x: Any, masks: list[Any] | None,
                 buffers: _Buffers) -> _Forward:
        xp, ops = self.backend.xp, self.backend.ops
        masks = masks or [None] * self.num_layers
        a = x if masks[0] is None else ops.apply_mask(x, masks[0])              # [B, D0]
        inputs, pre_activations = [a], []
        for layer in range(self.num_layers):
            name = dense_name(layer)
            kernel, bias = params[f"{name}/kernel"], params[f"{name}/bias"]
            z = xp.matmul(a, kernel, out=buffers.get(f"z{layer}", (a.shape[0], kernel.shape[1]), a.dtype))
            if layer == self.num_layers - 1:
                z += bias                                                        # [B, C] logits
                return _Forward(inputs, pre_activations, masks, z)
            a = ops.bias_act_dropout(z, bias, self.spec.activation, masks[layer + 1])  # [B, H]
            inputs.append(a)
            pre_activations.append(z)
        raise AssertionError("unreachable: a model has at least one dense layer")

    def _backward(self, params: Mapping[str, Any], forward: _Forward, delta: Any,
                  buffers: _Buffers) -> dict[str, Any]:
        xp, ops = self.backend.xp, self.backend.ops
        grads: dict[str, Any] = {}
        for layer in reversed(range(self.num_layers)):
            name = dense_name(layer)
            kernel = params[f"{name}/kernel"]
            a = forward.inputs[layer]
            grads[f"{name}/kernel"] = xp.matmul(a.T, delta, out=buffers.get(f"g{name}/k", kernel.shape, a.dtype))
            grads[f"{name}/bias"] = ops.sum_rows(delta, out=buffers.get(f"g{name}/b", (kernel.shape[1],), a.dtype))
            if layer > 0:
                da = xp.matmul(delta, kernel.T, out=buffers.get(f"da{layer}", a.shape, a.dtype))
                delta = ops.bias_act_dropout_grad(da, forward.pre_activations[layer - 1],
                                                  self.spec.activation, forward.masks[layer])
        return {name: grads[name] for name in self.param_names}

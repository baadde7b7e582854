"""Dense, activation, dropout, flatten, reshape and residual layers."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from orchestrator.engine.layers.base import (
    Builder, Layer, LayerSpecError, Option, Pass, Shape, backward_chain, boolean, build_chain, choice,
    forward_chain, parse_layers, positive_int, rate, register, shape,
)

ACTIVATIONS = ("linear", "relu", "gelu", "tanh")


def _rows(array: Any) -> Any:
    """[..., D] as [N, D] (a view when contiguous)."""
    return array.reshape(-1, array.shape[-1])


@register
class Dense(Layer):
    """y = act(x @ kernel + bias) over the last axis (Keras ``Dense``); gelu is the tanh form."""

    type = "dense"
    options = {"units": Option(positive_int), "activation": Option(choice(*ACTIVATIONS), "linear"),
               "use_bias": Option(boolean, True)}

    def build(self, builder: Builder, input_shape: Shape) -> Shape:
        super().build(builder, input_shape)
        fan_in, units = input_shape[-1], self.config["units"]
        self.kernel = builder.variable(f"{self.name}/kernel", (fan_in, units), "glorot_uniform", fan_in, units)
        self.bias = builder.variable(f"{self.name}/bias", (units,), "zeros") if self.config["use_bias"] else None
        return (*input_shape[:-1], units)

    def forward(self, params, x, run):
        kernel, activation = params[self.kernel], self.config["activation"]
        x2 = _rows(x)
        z = run.xp.matmul(x2, kernel)                                          # [N, units]
        if activation == "linear":
            if self.bias is not None:
                z += params[self.bias]
            return z.reshape(*x.shape[:-1], -1), (x2, None)
        bias = params[self.bias] if self.bias is not None else run.xp.zeros(z.shape[1], z.dtype)
        y = run.ops.bias_act_dropout(z, bias, activation, None)               # z kept pre-activation
        return y.reshape(*x.shape[:-1], -1), (x2, z)

    def backward(self, params, cache, dy, run, need_dx):
        x2, z = cache
        kernel, xp = params[self.kernel], run.xp
        dz = _rows(dy)
        if z is not None:
            dz = run.ops.bias_act_dropout_grad(dz, z, self.config["activation"], None)
        run.add_grad(self.kernel, xp.matmul(x2.T, dz))
        if self.bias is not None:
            run.add_grad(self.bias, run.ops.sum_rows(dz))
        if not need_dx:
            return None
        return xp.matmul(dz, kernel.T).reshape(*dy.shape[:-1], kernel.shape[0])


@register
class Activation(Layer):
    """Elementwise relu / gelu (tanh form) / tanh (Keras ``Activation``)."""

    type = "activation"
    options = {"activation": Option(choice(*ACTIVATIONS[1:]))}

    def forward(self, params, x, run):
        return run.ops.activation_forward(x, self.config["activation"]), x

    def backward(self, params, cache, dy, run, need_dx):
        if not need_dx:
            return None
        if not dy.flags.c_contiguous:
            dy = run.xp.ascontiguousarray(dy)
        return run.ops.bias_act_dropout_grad(dy, cache, self.config["activation"], None)


@register
class Dropout(Layer):
    """Zeroes a unit with probability ``rate`` while training, scaling the rest by 1/(1 - rate).

    Masks follow the engine's rule: a pure function of (seed, step, site, global example
    index, unit), where the site is this layer's place among the network's dropout sites.
    """

    type = "dropout"
    options = {"rate": Option(rate)}

    def build(self, builder, input_shape):
        self.site = builder.dropout_site()
        return super().build(builder, input_shape)

    def forward(self, params, x, run):
        mask = run.dropout_mask(self.site, x.shape, 1.0 - self.config["rate"], x.dtype)
        return (x if mask is None else run.ops.apply_mask(x, mask)), mask

    def backward(self, params, mask, dy, run, need_dx):
        if not need_dx or mask is None:
            return dy if need_dx else None
        dy *= mask
        return dy


@register
class Flatten(Layer):
    """[B, d1, d2, ...] -> [B, d1 * d2 * ...] in row-major order (Keras ``Flatten`` on NHWC)."""

    type = "flatten"

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, params, x, run):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, params, input_shape, dy, run, need_dx):
        return dy.reshape(input_shape) if need_dx else None


@register
class Reshape(Layer):
    """Per-example reshape (Keras ``Reshape``), e.g. 64 features -> [8, 8, 1] for a CNN."""

    type = "reshape"
    options = {"target_shape": Option(shape)}

    def output_shape(self, input_shape):
        target = tuple(self.config["target_shape"])
        if int(np.prod(target)) != int(np.prod(input_shape)):
            raise self._fail(f"cannot reshape {list(input_shape)} ({int(np.prod(input_shape))} values) "
                             f"to {list(target)}")
        return target

    def forward(self, params, x, run):
        return x.reshape(x.shape[0], *self.config["target_shape"]), x.shape

    def backward(self, params, input_shape, dy, run, need_dx):
        return dy.reshape(input_shape) if need_dx else None


@register
class Residual(Layer):
    """y = x + f(x), f the chain ``layers`` (whose output shape must equal its input shape).

    Not a Keras layer: its sublayers are named as if they stood in the enclosing list, as in a
    functional Keras model that adds the branch to its input.
    """

    type = "residual"

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str) -> "Residual":
        unknown = sorted(set(raw) - {"layers"})
        if unknown:
            raise LayerSpecError(f"{where}: unknown option(s) {unknown}; this layer takes ['layers']")
        layer = cls({}, where)
        layer.branch = parse_layers(raw.get("layers"), f"{where}.layers")
        return layer

    def to_config(self):
        return {"type": self.type, "layers": [sub.to_config() for sub in self.branch]}

    def build(self, builder, input_shape):
        self.name = self.type
        output = build_chain(self.branch, builder, input_shape)
        if tuple(output) != tuple(input_shape):
            raise self._fail(f"the branch maps {list(input_shape)} to {list(output)}; "
                             f"a residual branch must keep the shape")
        return input_shape

    def forward(self, params, x, run):
        branch, caches = forward_chain(self.branch, params, x, run)
        return x + branch, caches

    def backward(self, params, caches, dy, run: Pass, need_dx):
        d_branch = backward_chain(self.branch, params, caches, dy.copy(), run, need_dx=True)
        if not need_dx:
            return None
        d_branch += dy
        return d_branch

"""Layer normalization (and why there is no batch normalization).

``layer_normalization`` normalizes each position over its last axis with learned
``gamma``/``beta`` (Keras ``LayerNormalization``; its default epsilon 1e-3). Its
statistics are per example, so M workers holding slices of a batch compute exactly
what one process would.

Batch normalization is left out on purpose: its training statistics are means over
the batch, so with M workers each would normalize by its own slice's statistics and
the result would depend on M (breaking "M workers = one process" and bit-identical
resume at another M). Doing it right needs an all-reduce of the statistics inside
the forward pass of every layer, which the step protocol (one gradient exchange per
step) does not have.
"""

from __future__ import annotations

from orchestrator.engine.layers.base import Builder, Layer, Option, Shape, positive_number, register


@register
class LayerNormalization(Layer):
    type = "layer_normalization"
    options = {"epsilon": Option(positive_number, 1e-3)}

    def build(self, builder: Builder, input_shape: Shape) -> Shape:
        super().build(builder, input_shape)
        width = input_shape[-1]
        self.gamma = builder.variable(f"{self.name}/gamma", (width,), "ones")
        self.beta = builder.variable(f"{self.name}/beta", (width,), "zeros")
        return input_shape

    def forward(self, params, x, run):
        rows = x.reshape(-1, x.shape[-1])
        y, xhat, rstd = run.ops.layer_norm(rows, params[self.gamma], params[self.beta], self.config["epsilon"])
        return y.reshape(x.shape), (xhat, rstd)

    def backward(self, params, cache, dy, run, need_dx):
        xhat, rstd = cache
        rows = run.xp.ascontiguousarray(dy.reshape(-1, dy.shape[-1]))
        dx, dgamma, dbeta = run.ops.layer_norm_grad(rows, xhat, rstd, params[self.gamma])
        run.add_grad(self.gamma, dgamma)
        run.add_grad(self.beta, dbeta)
        return dx.reshape(dy.shape) if need_dx else None

"""Multi-head self-attention (Keras ``MultiHeadAttention`` called with query = value = x).

Variables as Keras names and shapes them: ``<name>/query/kernel`` [D, H, K],
``<name>/query/bias`` [H, K] (same for ``key`` and ``value``), ``<name>/attention_output/kernel``
[H, K, D] and ``<name>/attention_output/bias`` [D]. Each projection is one GEMM over
the [B*T, D] rows (the [D, H, K] kernel read as [D, H*K]); heads are strided views,
never copied, for the batched score and context products.

    scores = q k^T                               [B, H, T, T]
    probs  = softmax(scores / sqrt(K) + causal)  (fused kernel: scale, mask, softmax)
    out    = (dropout(probs) v) Wo + bo

With ``causal`` position t attends to positions <= t. Attention dropout draws its mask
from this layer's dropout site, per example, like every other dropout.
"""

from __future__ import annotations

import math

from orchestrator.engine.layers.base import (
    Builder, Layer, Option, Shape, boolean, optional_positive_int, positive_int, rate, register,
)

PROJECTIONS = ("query", "key", "value")


@register
class MultiHeadAttention(Layer):
    type = "multi_head_attention"
    options = {"num_heads": Option(positive_int), "key_dim": Option(optional_positive_int, None),
               "causal": Option(boolean, False), "dropout": Option(rate, 0.0),
               "use_bias": Option(boolean, True)}

    def build(self, builder: Builder, input_shape: Shape) -> Shape:
        super().build(builder, input_shape)
        if len(input_shape) != 2:
            raise self._fail(f"needs [positions, width] inputs, got {list(input_shape)}")
        width, heads = input_shape[1], self.config["num_heads"]
        key_dim = self.config["key_dim"]
        if key_dim is None:
            if width % heads:
                raise self._fail(f"width {width} is not a multiple of num_heads {heads}; set key_dim")
            key_dim = width // heads
        self.kernels, self.biases = {}, {}
        for part in PROJECTIONS:
            self.kernels[part] = builder.variable(f"{self.name}/{part}/kernel", (width, heads, key_dim),
                                                  "glorot_uniform", width, heads * key_dim)
            if self.config["use_bias"]:
                self.biases[part] = builder.variable(f"{self.name}/{part}/bias", (heads, key_dim), "zeros")
        self.kernels["output"] = builder.variable(f"{self.name}/attention_output/kernel", (heads, key_dim, width),
                                                  "glorot_uniform", heads * key_dim, width)
        if self.config["use_bias"]:
            self.biases["output"] = builder.variable(f"{self.name}/attention_output/bias", (width,), "zeros")
        self.site = builder.dropout_site()
        self.scale = 1.0 / math.sqrt(key_dim)
        return input_shape

    def _project(self, params, rows, part, batch, positions, xp):
        """[B*T, D] -> [B, H, T, K] (a strided view of one GEMM's output)."""
        kernel = params[self.kernels[part]]
        width, heads, key_dim = kernel.shape
        y = xp.matmul(rows, kernel.reshape(width, heads * key_dim))
        if part in self.biases:
            y += params[self.biases[part]].reshape(-1)
        return y.reshape(batch, positions, heads, key_dim).transpose(0, 2, 1, 3)

    def forward(self, params, x, run):
        xp = run.xp
        batch, positions, width = x.shape
        rows = x.reshape(batch * positions, width)
        q, k, v = (self._project(params, rows, part, batch, positions, xp) for part in PROJECTIONS)
        probs = run.ops.attention_softmax(xp.matmul(q, k.transpose(0, 1, 3, 2)), self.scale,
                                          self.config["causal"])                     # [B, H, T, T]
        mask = run.dropout_mask(self.site, probs.shape, 1.0 - self.config["dropout"], probs.dtype)
        context = xp.matmul(probs if mask is None else probs * mask, v)              # [B, H, T, K]
        context = context.transpose(0, 2, 1, 3).reshape(batch * positions, -1)       # [B*T, H*K]
        out_kernel = params[self.kernels["output"]]
        out = xp.matmul(context, out_kernel.reshape(-1, width))
        if "output" in self.biases:
            out += params[self.biases["output"]]
        return out.reshape(x.shape), (rows, q, k, v, probs, mask, context)

    def backward(self, params, cache, dy, run, need_dx):
        xp = run.xp
        rows, q, k, v, probs, mask, context = cache
        batch, heads, positions, key_dim = q.shape
        dout = dy.reshape(batch * positions, -1)
        out_kernel = params[self.kernels["output"]]
        run.add_grad(self.kernels["output"], xp.matmul(context.T, dout).reshape(out_kernel.shape))
        if "output" in self.biases:
            run.add_grad(self.biases["output"], dout.sum(axis=0))
        dcontext = xp.matmul(dout, out_kernel.reshape(heads * key_dim, -1).T)
        dcontext = dcontext.reshape(batch, positions, heads, key_dim).transpose(0, 2, 1, 3)
        dropped = probs if mask is None else probs * mask
        grads = {"value": xp.matmul(dropped.transpose(0, 1, 3, 2), dcontext)}
        dprobs = xp.matmul(dcontext, v.transpose(0, 1, 3, 2))                         # [B, H, T, T]
        if mask is not None:
            dprobs *= mask
        dscores = run.ops.attention_softmax_grad(dprobs, probs, self.scale)
        grads["query"] = xp.matmul(dscores, k)
        grads["key"] = xp.matmul(dscores.transpose(0, 1, 3, 2), q)
        dx = None
        for part in PROJECTIONS:
            d_rows = grads[part].transpose(0, 2, 1, 3).reshape(batch * positions, heads * key_dim)
            kernel = params[self.kernels[part]]
            run.add_grad(self.kernels[part], xp.matmul(rows.T, d_rows).reshape(kernel.shape))
            if part in self.biases:
                run.add_grad(self.biases[part], d_rows.sum(axis=0).reshape(heads, key_dim))
            if need_dx:
                term = xp.matmul(d_rows, kernel.reshape(kernel.shape[0], -1).T)
                dx = term if dx is None else xp.add(dx, term, out=dx)
        return None if dx is None else dx.reshape(dy.shape)

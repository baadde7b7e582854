"""Multi-head self-attention (Keras ``MultiHeadAttention`` called with query = value = x).

Variables as Keras names and shapes them: ``<name>/query/kernel`` [D, H, K],
``<name>/query/bias`` [H, K] (same for ``key`` and ``value``), ``<name>/attention_output/kernel``
[H, K, D] and ``<name>/attention_output/bias`` [D]. The projections are GEMMs over
the [B*T, D] rows (a [D, H, K] kernel read as [D, H*K]); heads are strided views,
never copied, for the batched score and context products.

    scores = (q / sqrt(K)) k^T                   [B, H, T, T]
    probs  = softmax(scores + causal)            (fused kernel: mask, softmax)
    out    = (dropout(probs) v) Wo + bo

The query, key and value projections run as one GEMM against the three kernels side by side
([D, 3*H*K], concatenated per step: 48 KiB for d_model 64), and so do their gradients
(``x^T d_qkv``) and the input gradient (``d_qkv W^T``): 3 GEMMs instead of 9, whose head views
the batched products read (and whose gradient views they fill). The 1/sqrt(K) scale multiplies q ([B, H, T, K])
rather than the scores ([B, H, T, T], T/K times larger).

With ``causal`` position t attends to positions <= t. Attention dropout draws its mask
from this layer's dropout site, per example, like every other dropout; with ``causal`` the
numpy kernels draw only the mask units at or below the diagonal (``causal_blocks``), the same
bits there as a full draw, since the units above it only ever multiply zero probabilities.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from orchestrator.engine import kernels_numpy, rng
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

    def forward(self, params, x, run):
        xp, ops = run.xp, run.ops
        batch, positions, width = x.shape
        rows = x.reshape(batch * positions, width)
        kernel, bias = self._fused(params, xp)
        qkv = xp.matmul(rows, kernel)                                                # [B*T, 3*H*K]: one GEMM
        if bias is not None:
            qkv += bias
        q, k, v = _heads(qkv.reshape(batch, positions, 3, *self._heads_shape(params)))  # [B, H, T, K] views
        q *= q.dtype.type(self.scale)       # the 1/sqrt(K) of the scores, on q: a quarter of the elements
        shape = (batch, q.shape[1], positions, positions)                           # [B, H, T, T]
        blocks = causal_blocks(*shape[1:]) if self.config["causal"] else None
        mask = run.dropout_mask(self.site, shape, 1.0 - self.config["dropout"], q.dtype, blocks)
        probs, dropped = ops.attention_softmax(xp.matmul(q, k.transpose(0, 1, 3, 2)), 1.0,
                                               self.config["causal"], mask)         # dropped = probs * mask
        context = xp.matmul(dropped, v)                                     # [B, H, T, K]
        context = context.transpose(0, 2, 1, 3).reshape(batch * positions, -1)       # [B*T, H*K]
        out_kernel = params[self.kernels["output"]]
        out = xp.matmul(context, out_kernel.reshape(-1, width))
        if "output" in self.biases:
            out += params[self.biases["output"]]
        return out.reshape(x.shape), (rows, kernel, q, k, v, probs, mask, dropped, context)

    def _heads_shape(self, params) -> tuple[int, int]:
        return tuple(params[self.kernels["query"]].shape[1:])

    def _fused(self, params, xp):
        """The query, key and value kernels side by side [D, 3*H*K] (and biases [3*H*K], or None)."""
        kernels = [params[self.kernels[part]] for part in PROJECTIONS]
        kernel = xp.concatenate([k.reshape(k.shape[0], -1) for k in kernels], axis=1)
        if not self.biases:
            return kernel, None
        return kernel, xp.concatenate([params[self.biases[part]].reshape(-1) for part in PROJECTIONS])

    def backward(self, params, cache, dy, run, need_dx):
        xp, ops = run.xp, run.ops
        rows, kernel, q, k, v, probs, mask, dropped, context = cache
        batch, heads, positions, key_dim = q.shape
        dout = dy.reshape(batch * positions, -1)
        out_kernel = params[self.kernels["output"]]
        run.add_grad(self.kernels["output"], xp.matmul(context.T, dout).reshape(out_kernel.shape))
        if "output" in self.biases:
            run.add_grad(self.biases["output"], ops.sum_rows(dout))
        dcontext = xp.matmul(dout, out_kernel.reshape(heads * key_dim, -1).T)
        dcontext = dcontext.reshape(batch, positions, heads, key_dim).transpose(0, 2, 1, 3)
        d_qkv = xp.empty((batch, positions, 3, heads, key_dim), dtype=q.dtype)        # the three grads side by side
        dq, dk, dv = _heads(d_qkv)              # (written by assignment: cupy's batched matmul takes no out=)
        dv[...] = xp.matmul(dropped.transpose(0, 1, 3, 2), dcontext)
        dprobs = xp.matmul(dcontext, v.transpose(0, 1, 3, 2))                        # [B, H, T, T]
        dscores = ops.attention_softmax_grad(dprobs, probs, 1.0, mask)                # d(scaled scores)
        xp.multiply(xp.matmul(dscores, k), dq.dtype.type(self.scale), out=dq)
        dk[...] = xp.matmul(dscores.transpose(0, 1, 3, 2), q)                       # q holds the scale
        d_rows = d_qkv.reshape(batch * positions, -1)                               # [B*T, 3*H*K]
        kernel_grads = xp.matmul(rows.T, d_rows)                                     # [D, 3*H*K]: one GEMM
        bias_grads = ops.sum_rows(d_rows) if self.biases else None
        width = heads * key_dim
        for index, part in enumerate(PROJECTIONS):
            columns = slice(index * width, (index + 1) * width)
            shape = params[self.kernels[part]].shape
            run.add_grad(self.kernels[part], xp.ascontiguousarray(kernel_grads[:, columns]).reshape(shape))
            if part in self.biases:
                run.add_grad(self.biases[part], bias_grads[columns].reshape(heads, key_dim))
        if not need_dx:
            return None
        return xp.matmul(d_rows, kernel.T).reshape(dy.shape)


@functools.lru_cache(maxsize=16)
def causal_blocks(heads: int, queries: int, keys: int) -> np.ndarray | None:
    """The Philox blocks (``unit // 8``) of one example's [H, T, S] probabilities holding a visible key.

    Probabilities of future keys are exactly 0, and so is everything computed from their mask
    units (the forward product, and the softmax gradient, which multiplies by the probability),
    so only these blocks need random bits: 56 % of them for T = S = 64. None when every block
    has a visible key or the units are not whole blocks (then the whole mask is drawn).
    """
    per_block = rng.UNITS_PER_BLOCK
    units = heads * queries * keys
    if units % per_block:
        return None
    visible = kernels_numpy.causal_visible(queries, keys)                # the softmax's own rule
    per_unit = np.broadcast_to(visible, (heads, queries, keys)).reshape(-1, per_block)
    blocks = np.flatnonzero(per_unit.any(axis=1))
    if len(blocks) == len(per_unit):
        return None
    blocks.flags.writeable = False
    return blocks


def _heads(qkv):
    """[B, T, 3, H, K] -> the three [B, H, T, K] views (query, key, value)."""
    return tuple(qkv[:, :, index].transpose(0, 2, 1, 3) for index in range(3))

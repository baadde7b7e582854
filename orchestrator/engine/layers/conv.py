"""Convolution and pooling on NHWC images, TensorFlow's padding rules.

``conv2d`` is im2col + one GEMM: the (kh, kw) shifted views of the padded input are
copied side by side into a [B*OH*OW, kh*kw*C] matrix whose column order matches the
Keras kernel [kh, kw, C, F] flattened, so forward is ``cols @ kernel`` and backward
``cols.T @ dz`` (kernel) and ``dz @ kernel.T`` scattered back by the same views (input).
Pooling walks the kh*kw window offsets with whole-array ops. Everything is plain
slicing and GEMM, so the same code runs on numpy and cupy.

Padding ``same`` pads (out - 1) * stride + k - in in total, the smaller half before
(TF's rule); ``valid`` pads nothing. Max pooling sends each window's gradient to its
first maximum in row-major order (TF's MaxPoolGrad); average pooling with ``same``
divides by the number of real (unpadded) inputs in each window, as TF does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.engine.layers.base import (
    Builder, Layer, Option, Shape, choice, optional_pair, pair, positive_int, register,
)
from orchestrator.engine.layers.core import ACTIVATIONS


def output_size(size: int, window: int, stride: int, padding: str) -> tuple[int, int, int]:
    """(output size, padding before, padding after) along one axis."""
    if padding == "valid":
        return (size - window) // stride + 1, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return out, total // 2, total - total // 2


class _Windowed(Layer):
    """Shared geometry of conv2d and pooling: window, strides, padding on [H, W, C] inputs."""

    def _geometry(self, input_shape: Shape, window: list[int], strides: list[int]) -> Shape:
        if len(input_shape) != 3:
            raise self._fail(f"needs [height, width, channels] inputs, got {list(input_shape)}")
        self.window, self.strides = tuple(window), tuple(strides)
        rows = output_size(input_shape[0], window[0], strides[0], self.config["padding"])
        cols = output_size(input_shape[1], window[1], strides[1], self.config["padding"])
        if rows[0] < 1 or cols[0] < 1:
            raise self._fail(f"window {window} does not fit the {list(input_shape[:2])} input "
                             f"with padding {self.config['padding']!r}")
        self.out_hw = (rows[0], cols[0])
        self.pads = ((rows[1], rows[2]), (cols[1], cols[2]))
        return self.out_hw

    def _padded(self, xp, x, fill: float) -> Any:
        (top, bottom), (left, right) = self.pads
        if not (top or bottom or left or right):
            return x
        batch, height, width, channels = x.shape
        padded = xp.full((batch, height + top + bottom, width + left + right, channels), fill, dtype=x.dtype)
        padded[:, top:top + height, left:left + width, :] = x       # 8x cheaper than xp.pad on 8x8 images
        return padded

    def _offsets(self):
        """(i, j, row slice, column slice) of every window offset into the padded input."""
        (oh, ow), (sh, sw) = self.out_hw, self.strides
        for i in range(self.window[0]):
            for j in range(self.window[1]):
                yield i, j, slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw)

    def _unpad(self, padded: Any, input_shape: tuple) -> Any:
        (top, _), (left, _) = self.pads
        return padded[:, top:top + input_shape[1], left:left + input_shape[2], :]

    def _padded_zeros(self, xp, input_shape: tuple, dtype) -> Any:
        (top, bottom), (left, right) = self.pads
        batch, height, width, channels = input_shape
        return xp.zeros((batch, height + top + bottom, width + left + right, channels), dtype=dtype)


@register
class Conv2D(_Windowed):
    """2-D convolution (cross-correlation, as TF), kernel [kh, kw, C, filters] (Keras ``Conv2D``)."""

    type = "conv2d"
    options = {"filters": Option(positive_int), "kernel_size": Option(pair), "strides": Option(pair, 1),
               "padding": Option(choice("valid", "same"), "valid"),
               "activation": Option(choice(*ACTIVATIONS), "linear")}

    def build(self, builder: Builder, input_shape: Shape) -> Shape:
        super().build(builder, input_shape)
        out_hw = self._geometry(input_shape, self.config["kernel_size"], self.config["strides"])
        kh, kw = self.window
        channels, filters = input_shape[2], self.config["filters"]
        self.kernel = builder.variable(f"{self.name}/kernel", (kh, kw, channels, filters), "glorot_uniform",
                                       kh * kw * channels, kh * kw * filters)
        self.bias = builder.variable(f"{self.name}/bias", (filters,), "zeros")
        return (*out_hw, filters)

    def _im2col(self, xp, x) -> Any:
        batch, channels = x.shape[0], x.shape[3]
        (oh, ow), (kh, kw) = self.out_hw, self.window
        padded = self._padded(xp, x, 0.0)
        cols = xp.empty((batch, oh, ow, kh, kw, channels), dtype=x.dtype)
        for i, j, rows, columns in self._offsets():
            cols[:, :, :, i, j, :] = padded[:, rows, columns, :]
        return cols.reshape(batch * oh * ow, kh * kw * channels)

    def forward(self, params, x, run):
        kernel = params[self.kernel]
        cols = self._im2col(run.xp, x)                                      # [B*OH*OW, kh*kw*C]
        z = run.xp.matmul(cols, kernel.reshape(-1, kernel.shape[3]))       # [B*OH*OW, F]
        activation = self.config["activation"]
        if activation == "linear":
            z += params[self.bias]
            y, z = z, None
        else:
            y = run.ops.bias_act_dropout(z, params[self.bias], activation, None)
        return y.reshape(x.shape[0], *self.out_hw, -1), (cols, z, x.shape)

    def backward(self, params, cache, dy, run, need_dx):
        cols, z, input_shape = cache
        xp, kernel = run.xp, params[self.kernel]
        dz = dy.reshape(-1, kernel.shape[3])
        if z is not None:
            dz = run.ops.bias_act_dropout_grad(dz, z, self.config["activation"], None)
        run.add_grad(self.kernel, xp.matmul(cols.T, dz).reshape(kernel.shape))
        run.add_grad(self.bias, run.ops.sum_rows(dz))
        if not need_dx:
            return None
        dcols = xp.matmul(dz, kernel.reshape(-1, kernel.shape[3]).T)
        dcols = dcols.reshape(input_shape[0], *self.out_hw, *self.window, input_shape[3])
        padded = self._padded_zeros(xp, input_shape, dy.dtype)
        for i, j, rows, columns in self._offsets():
            padded[:, rows, columns, :] += dcols[:, :, :, i, j, :]
        return self._unpad(padded, input_shape)


class _Pooling(_Windowed):
    options = {"pool_size": Option(pair, 2), "strides": Option(optional_pair, None),
               "padding": Option(choice("valid", "same"), "valid")}

    def build(self, builder, input_shape):
        super().build(builder, input_shape)
        strides = self.config["strides"] or self.config["pool_size"]     # Keras: strides default to pool_size
        out_hw = self._geometry(input_shape, self.config["pool_size"], strides)
        return (*out_hw, input_shape[2])


@register
class MaxPooling2D(_Pooling):
    """Window maximum (Keras ``MaxPooling2D``); padding never wins a window (filled with -inf)."""

    type = "max_pooling2d"

    def forward(self, params, x, run):
        padded = self._padded(run.xp, x, -np.inf)
        out = None
        for _, _, rows, columns in self._offsets():
            window = padded[:, rows, columns, :]
            out = window.copy() if out is None else run.xp.maximum(out, window, out=out)
        return out, (padded, out, x.shape)

    def backward(self, params, cache, dy, run, need_dx):
        if not need_dx:
            return None
        xp = run.xp
        padded, out, input_shape = cache
        dpadded = self._padded_zeros(xp, input_shape, dy.dtype)
        taken = xp.zeros(out.shape, dtype=bool)
        for _, _, rows, columns in self._offsets():
            first = (padded[:, rows, columns, :] == out) & ~taken            # first maximum of the window
            dpadded[:, rows, columns, :] += dy * first
            taken |= first
        return self._unpad(dpadded, input_shape)


@register
class AveragePooling2D(_Pooling):
    """Window mean (Keras ``AveragePooling2D``); with ``same`` only real inputs are counted."""

    type = "average_pooling2d"

    def _inverse_counts(self, xp, input_shape, dtype) -> Any:
        """[1, OH, OW, 1]: 1 / (number of unpadded inputs in each window)."""
        ones = self._padded_zeros(np, (1, *input_shape[1:3], 1), np.float64)
        (top, _), (left, _) = self.pads
        ones[:, top:top + input_shape[1], left:left + input_shape[2], :] = 1.0
        counts = sum(ones[:, rows, columns, :] for _, _, rows, columns in self._offsets())
        return xp.asarray(1.0 / counts, dtype=dtype)

    def forward(self, params, x, run):
        xp = run.xp
        padded = self._padded(xp, x, 0.0)
        out = None
        for _, _, rows, columns in self._offsets():
            window = padded[:, rows, columns, :]
            out = window.copy() if out is None else xp.add(out, window, out=out)
        inverse = self._inverse_counts(xp, x.shape, x.dtype)
        out *= inverse
        return out, (inverse, x.shape)

    def backward(self, params, cache, dy, run, need_dx):
        if not need_dx:
            return None
        inverse, input_shape = cache
        share = dy * inverse
        dpadded = self._padded_zeros(run.xp, input_shape, dy.dtype)
        for _, _, rows, columns in self._offsets():
            dpadded[:, rows, columns, :] += share
        return self._unpad(dpadded, input_shape)

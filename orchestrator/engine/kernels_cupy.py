"""The engine's kernels on cupy: one fused CUDA kernel per function.

Same names and semantics as ``kernels_numpy`` (read that module for the math);
imported only through ``backend.cupy_backend()``, so importing the engine never
needs cupy. Matmuls are not here: models call ``cupy.matmul`` (cuBLAS).

- dropout masks: ``ElementwiseKernel`` running Philox4x32-10 (``rng.CUDA_PHILOX_SOURCE``),
  the same bits as ``rng.keep_mask`` on numpy;
- bias + activation (+ dropout) forward and backward: ``ElementwiseKernel``;
- softmax cross-entropy forward + backward in one pass: ``RawKernel`` (one thread per row),
  the loss summed in float64 by a ``ReductionKernel``;
- optimizer updates, one fused ``ElementwiseKernel`` per rule.

Kernels are compiled with ``--fmad=false`` so a*b+c rounds as numpy does (no
fused multiply-add), keeping the two paths within a few ulps.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from orchestrator.engine import rng

ACTIVATIONS = ("relu", "gelu")
_OPTIONS = ("--fmad=false",)

_GELU_DEFS = "const T gelu_c = (T)0.7978845608028654; const T gelu_a = (T)0.044715;"
_ACT_FORWARD = {
    "relu": "T act = v > (T)0 ? v : (T)0;",
    "gelu": _GELU_DEFS + "T act = (T)0.5 * (v * ((T)1 + tanh(gelu_c * (v + gelu_a * v * v * v))));",
}
_ACT_GRAD = {
    "relu": "T slope = z > (T)0 ? (T)1 : (T)0;",
    "gelu": _GELU_DEFS + (
        "T z2 = z * z; T t = tanh(gelu_c * (z + gelu_a * z2 * z));"
        "T inner = gelu_c * ((T)1 + (T)3 * gelu_a * z2);"
        "T slope = (T)0.5 * ((T)1 + t) + (T)0.5 * z * ((T)1 - t * t) * inner;"),
}


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# --------------------------------------------------------------------------- dropout
_dropout_mask_kernel = cp.ElementwiseKernel(
    "uint64 seed, uint64 step, uint32 layer, int64 example_offset, int64 units, uint32 threshold, T scale",
    "T mask",
    """
    long long row = i / units;
    unsigned int unit = (unsigned int)(i % units);
    unsigned long long example = (unsigned long long)(example_offset + row);
    mask = orch_dropout_keep(seed, step, layer, example, unit, threshold) ? scale : (T)0;
    """,
    "orch_dropout_mask",
    preamble=rng.CUDA_PHILOX_SOURCE,
)


def dropout_mask(seed: int, step: int, layer: int, example_offset: int,
                 shape: tuple[int, int], keep_prob: float, dtype) -> cp.ndarray:
    """Scaled keep-mask [B, D]: 1/keep_prob where kept, 0 where dropped (see ``rng``)."""
    dtype = np.dtype(dtype)
    mask = cp.empty(shape, dtype=dtype)
    _dropout_mask_kernel(np.uint64(seed), np.uint64(int(step) & 0xFFFFFFFFFFFFFFFF),
                         np.uint32(int(layer) & 0xFFFFFFFF), np.int64(example_offset),
                         np.int64(shape[1]), np.uint32(rng.keep_threshold(keep_prob)),
                         dtype.type(1.0 / keep_prob), mask)
    return mask


def apply_mask(x: cp.ndarray, mask: cp.ndarray | None) -> cp.ndarray:
    """x * mask as a new array."""
    return x.copy() if mask is None else cp.multiply(x, mask)


# --------------------------------------------------------------------------- dense + activation
@functools.lru_cache(maxsize=None)
def _bias_act_kernel(activation: str, masked: bool) -> cp.ElementwiseKernel:
    mask_in = ", T mask" if masked else ""
    times_mask = " * mask" if masked else ""
    return cp.ElementwiseKernel(
        "T bias" + mask_in, "T z, T a",
        "T v = z + bias; z = v; " + _ACT_FORWARD[activation] + f" a = act{times_mask};",
        f"orch_bias_{activation}{'_dropout' if masked else ''}", options=_OPTIONS)


@functools.lru_cache(maxsize=None)
def _act_grad_kernel(activation: str, masked: bool) -> cp.ElementwiseKernel:
    mask_in = ", T mask" if masked else ""
    times_mask = "da = da * mask; " if masked else ""
    return cp.ElementwiseKernel(
        "T z" + mask_in, "T da",
        _ACT_GRAD[activation] + times_mask + " da = da * slope;",
        f"orch_{activation}{'_dropout' if masked else ''}_grad", options=_OPTIONS)


def bias_act_dropout(z: cp.ndarray, bias: cp.ndarray, activation: str,
                     mask: cp.ndarray | None) -> cp.ndarray:
    """z += bias (in place, kept for the backward pass); returns act(z) * mask."""
    _check_activation(activation)
    a = cp.empty_like(z)
    kernel = _bias_act_kernel(activation, mask is not None)
    if mask is None:
        kernel(bias, z, a)
    else:
        kernel(bias, mask, z, a)
    return a


def bias_act_dropout_grad(da: cp.ndarray, z: cp.ndarray, activation: str,
                          mask: cp.ndarray | None) -> cp.ndarray:
    """dL/dz = da * mask * act'(z), computed in place in ``da``."""
    _check_activation(activation)
    kernel = _act_grad_kernel(activation, mask is not None)
    if mask is None:
        kernel(z, da)
    else:
        kernel(z, mask, da)
    return da


# --------------------------------------------------------------------------- loss
_SOFTMAX_XENT_SOURCE = r"""
template<typename T>
__global__ void orch_softmax_xent(T* logits, const long long* labels, T* loss, int* correct,
                                  const int rows, const int classes, const T scale) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    T* row = logits + (long long)r * classes;
    T top = row[0];
    int arg = 0;
    for (int j = 1; j < classes; ++j) {
        if (row[j] > top) { top = row[j]; arg = j; }
    }
    const long long label = labels[r];
    const T label_shifted = row[label] - top;
    T total = (T)0;
    for (int j = 0; j < classes; ++j) {
        const T e = exp(row[j] - top);
        row[j] = e;
        total += e;
    }
    loss[r] = log(total) - label_shifted;
    correct[r] = (arg == label) ? 1 : 0;
    const T factor = scale / total;
    for (int j = 0; j < classes; ++j) {
        row[j] = row[j] * factor;
    }
    row[label] -= scale;
}
"""
_XENT_NAMES = {np.dtype(np.float32): "orch_softmax_xent<float>", np.dtype(np.float64): "orch_softmax_xent<double>"}
_THREADS = 128


@functools.lru_cache(maxsize=None)
def _softmax_module() -> cp.RawModule:
    return cp.RawModule(code=_SOFTMAX_XENT_SOURCE, options=_OPTIONS,
                        name_expressions=list(_XENT_NAMES.values()))


_sum_float64 = cp.ReductionKernel("T x", "float64 total", "(double)x", "a + b", "total = a", "0",
                                  "orch_sum_float64")


def softmax_cross_entropy(logits: cp.ndarray, labels: cp.ndarray,
                          grad_scale: float) -> tuple[float, int, cp.ndarray]:
    """Sum of per-example softmax cross-entropy, number correct, and the gradient
    (softmax - onehot) * grad_scale written over ``logits``. Two device -> host syncs."""
    dtype = np.dtype(logits.dtype)
    if dtype not in _XENT_NAMES:
        raise TypeError(f"softmax_cross_entropy supports float32/float64 logits, got {dtype}")
    rows, classes = logits.shape
    logits = cp.ascontiguousarray(logits)   # no copy for the matmul outputs the model passes
    labels = cp.ascontiguousarray(labels, dtype=cp.int64)
    loss = cp.empty(rows, dtype=dtype)
    correct = cp.empty(rows, dtype=cp.int32)
    kernel = _softmax_module().get_function(_XENT_NAMES[dtype])
    blocks = (rows + _THREADS - 1) // _THREADS
    kernel((blocks,), (_THREADS,), (logits, labels, loss, correct, np.int32(rows),
                                    np.int32(classes), dtype.type(grad_scale)))
    loss_sum = float(_sum_float64(loss))        # device -> host sync
    num_correct = int(correct.sum())            # device -> host sync
    return loss_sum, num_correct, logits


# --------------------------------------------------------------------------- optimizers
_sgd_kernel = cp.ElementwiseKernel(
    "T grad, T lr", "T var", "var = var - lr * grad;", "orch_sgd", options=_OPTIONS)

_momentum_kernel = cp.ElementwiseKernel(
    "T grad, T lr, T momentum", "T var, T accum",
    "T acc = accum * momentum; acc = acc + grad; accum = acc; var = var - lr * acc;",
    "orch_momentum", options=_OPTIONS)

_rmsprop_kernel = cp.ElementwiseKernel(
    "T grad, T lr, T one_minus_decay, T momentum, T epsilon", "T var, T ms, T mom",
    """
    T s = grad * grad; s = s - ms; s = s * one_minus_decay;
    T new_ms = ms + s; ms = new_ms;
    T step = grad / sqrt(new_ms + epsilon); step = step * lr;
    T new_mom = mom * momentum; new_mom = new_mom + step; mom = new_mom;
    var = var - new_mom;
    """,
    "orch_rmsprop", options=_OPTIONS)

_adam_kernel = cp.ElementwiseKernel(
    "T grad, T lr_t, T one_minus_beta1, T one_minus_beta2, T epsilon", "T var, T m, T v",
    """
    T dm = grad - m; dm = dm * one_minus_beta1; T new_m = m + dm; m = new_m;
    T dv = grad * grad; dv = dv - v; dv = dv * one_minus_beta2; T new_v = v + dv; v = new_v;
    T step = new_m * lr_t; step = step / (sqrt(new_v) + epsilon);
    var = var - step;
    """,
    "orch_adam", options=_OPTIONS)


def sgd_update(var: cp.ndarray, grad: cp.ndarray, lr: float) -> None:
    t = var.dtype.type
    _sgd_kernel(grad, t(lr), var)


def momentum_update(var: cp.ndarray, accum: cp.ndarray, grad: cp.ndarray,
                    lr: float, momentum: float) -> None:
    t = var.dtype.type
    _momentum_kernel(grad, t(lr), t(momentum), var, accum)


def rmsprop_update(var: cp.ndarray, ms: cp.ndarray, mom: cp.ndarray, grad: cp.ndarray,
                   lr: float, decay: float, momentum: float, epsilon: float) -> None:
    t = var.dtype.type
    _rmsprop_kernel(grad, t(lr), t(1) - t(decay), t(momentum), t(epsilon), var, ms, mom)


def adam_update(var: cp.ndarray, m: cp.ndarray, v: cp.ndarray, grad: cp.ndarray,
                lr_t: float, beta1: float, beta2: float, epsilon: float) -> None:
    t = var.dtype.type
    _adam_kernel(grad, t(lr_t), t(1) - t(beta1), t(1) - t(beta2), t(epsilon), var, m, v)

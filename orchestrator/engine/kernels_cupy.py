"""The engine's kernels on cupy: one fused CUDA kernel per function.

Same names and semantics as ``kernels_numpy`` (read that module for the math);
imported only through ``backend.cupy_backend()``, so importing the engine never
needs cupy. Matmuls are not here: models call ``cupy.matmul`` (cuBLAS).

- dropout masks: ``ElementwiseKernel`` running Philox4x32-10 (``rng.CUDA_PHILOX_SOURCE``),
  the same bits as ``rng.keep_mask`` on numpy;
- bias + activation (+ dropout) forward and backward, activation alone: ``ElementwiseKernel``;
- softmax cross-entropy forward + backward in one pass: ``RawKernel`` (one thread per row),
  the loss summed in float64 by a ``ReductionKernel``;
- layer normalization forward, and its input gradient: one warp per row (``RawModule``);
- attention softmax (scale, causal mask, softmax in one pass) and its gradient: one warp per row;
- embedding gradients: ``cupy.add.at`` (atomic adds of repeated rows);
- optimizer updates, one fused ``ElementwiseKernel`` per rule.

The CUDA sources live in ``cuda_sources`` (compile-checked without a GPU). Kernels are
compiled with ``--fmad=false`` so a*b+c rounds as numpy does (no fused multiply-add),
keeping the two paths within a few ulps.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from orchestrator.engine import cuda_sources, rng
from orchestrator.errors import InvalidArgumentError

ACTIVATIONS = tuple(cuda_sources.ACT_FORWARD)
_OPTIONS = ("--fmad=false",)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# --------------------------------------------------------------------------- dropout
_dropout_mask_kernel = cp.ElementwiseKernel(*cuda_sources.DROPOUT_MASK, "orch_dropout_mask",
                                            preamble=rng.CUDA_PHILOX_SOURCE)


def dropout_mask(seed: int, step: int, layer: int, example_offset: int,
                 shape: tuple[int, int], keep_prob: float, dtype, blocks=None) -> cp.ndarray:
    """Scaled keep-mask [B, D]: 1/keep_prob where kept, 0 where dropped (see ``rng``).

    ``blocks`` (numpy's hint to draw only some Philox blocks) is ignored: every unit is drawn,
    which a GPU does in one cheap pass; callers pass it only where the other units multiply zeros.
    """
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
    return cp.ElementwiseKernel(*cuda_sources.bias_act(activation, masked),
                                f"orch_bias_{activation}{'_dropout' if masked else ''}", options=_OPTIONS)


@functools.lru_cache(maxsize=None)
def _act_grad_kernel(activation: str, masked: bool) -> cp.ElementwiseKernel:
    return cp.ElementwiseKernel(*cuda_sources.act_grad(activation, masked),
                                f"orch_{activation}{'_dropout' if masked else ''}_grad", options=_OPTIONS)


@functools.lru_cache(maxsize=None)
def _act_kernel(activation: str) -> cp.ElementwiseKernel:
    return cp.ElementwiseKernel(*cuda_sources.act(activation), f"orch_{activation}", options=_OPTIONS)


def activation_forward(z: cp.ndarray, activation: str) -> cp.ndarray:
    """act(z) as a new array (z is kept for the backward pass)."""
    _check_activation(activation)
    return _act_kernel(activation)(z)


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
_XENT_NAMES = {np.dtype(np.float32): "orch_softmax_xent<float>", np.dtype(np.float64): "orch_softmax_xent<double>"}
_THREADS = 128


@functools.lru_cache(maxsize=None)
def _softmax_module() -> cp.RawModule:
    return cp.RawModule(code=cuda_sources.RAW_SOFTMAX_XENT, options=_OPTIONS,
                        name_expressions=list(_XENT_NAMES.values()))


_sum_float64 = cp.ReductionKernel("T x", "float64 total", "(double)x", "a + b", "total = a", "0",
                                  "orch_sum_float64")


def softmax_cross_entropy(logits: cp.ndarray, labels: cp.ndarray,
                          grad_scale: float) -> tuple[float, int, cp.ndarray]:
    """Sum of per-example softmax cross-entropy, number correct, and the gradient
    (softmax - onehot) * grad_scale written over ``logits``. Two device -> host syncs."""
    dtype = np.dtype(logits.dtype)
    if dtype not in _XENT_NAMES:
        raise InvalidArgumentError(f"softmax_cross_entropy supports float32/float64 logits, got {dtype}")
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


# --------------------------------------------------------------------------- warp-per-row kernels
_WARPS_PER_BLOCK = 4
_TYPE_NAMES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


@functools.lru_cache(maxsize=None)
def _warp_module(source_key: str) -> cp.RawModule:
    source, functions = cuda_sources.RAW_SOURCES[source_key]
    names = [f"{f}<{t}>" for f in functions for t in _TYPE_NAMES.values()]
    return cp.RawModule(code=source, options=_OPTIONS, name_expressions=names)


def _launch_rows(source_key: str, function: str, rows: int, dtype, args: tuple) -> None:
    """Run ``function<T>`` with one warp per row (``_WARPS_PER_BLOCK`` rows per block)."""
    dtype = np.dtype(dtype)
    if dtype not in _TYPE_NAMES:
        raise InvalidArgumentError(f"{function} supports float32/float64, got {dtype}")
    kernel = _warp_module(source_key).get_function(f"{function}<{_TYPE_NAMES[dtype]}>")
    blocks = (rows + _WARPS_PER_BLOCK - 1) // _WARPS_PER_BLOCK
    kernel((blocks,), (32 * _WARPS_PER_BLOCK,), args)


def layer_norm(x: cp.ndarray, gamma: cp.ndarray, beta: cp.ndarray,
               epsilon: float) -> tuple[cp.ndarray, cp.ndarray, cp.ndarray]:
    """Rows of x [N, D] normalized: (y = xhat * gamma + beta, xhat, rstd [N, 1]); x is not written."""
    x = cp.ascontiguousarray(x)
    rows, cols = x.shape
    y, xhat = cp.empty_like(x), cp.empty_like(x)
    rstd = cp.empty((rows, 1), dtype=x.dtype)
    t = x.dtype.type
    _launch_rows("layer_norm", "orch_layer_norm", rows, x.dtype,
                 (x, cp.ascontiguousarray(gamma), cp.ascontiguousarray(beta), y, xhat, rstd,
                  np.int32(rows), np.int32(cols), t(epsilon)))
    return y, xhat, rstd


def layer_norm_grad(dy: cp.ndarray, xhat: cp.ndarray, rstd: cp.ndarray,
                    gamma: cp.ndarray) -> tuple[cp.ndarray, cp.ndarray, cp.ndarray]:
    """(dx, dgamma, dbeta) for ``layer_norm``; ``dy`` [N, D] (contiguous) is overwritten (it becomes dx)."""
    dgamma = cp.sum(dy * xhat, axis=0)
    dbeta = cp.sum(dy, axis=0)
    rows, cols = dy.shape
    _launch_rows("layer_norm", "orch_layer_norm_grad", rows, dy.dtype,
                 (dy, xhat, rstd, cp.ascontiguousarray(gamma), np.int32(rows), np.int32(cols)))
    return dy, dgamma, dbeta


def attention_softmax(scores: cp.ndarray, scale: float, causal: bool,
                      mask: cp.ndarray | None = None) -> tuple[cp.ndarray, cp.ndarray]:
    """softmax(scale * scores) over the last axis, future keys masked when ``causal``, in place;
    returns (probs, dropped): dropped = probs * mask (dropout, a new array), or probs without a mask."""
    scores = cp.ascontiguousarray(scores)          # matmul output: already contiguous, no copy
    queries, keys = scores.shape[-2], scores.shape[-1]
    rows = scores.size // keys
    _launch_rows("attention_softmax", "orch_attention_softmax", rows, scores.dtype,
                 (scores, np.int32(rows), np.int32(queries), np.int32(keys), scores.dtype.type(scale),
                  np.int32(1 if causal else 0)))
    return scores, (scores if mask is None else cp.multiply(scores, mask))


def attention_softmax_grad(dprobs: cp.ndarray, probs: cp.ndarray, scale: float,
                           mask: cp.ndarray | None = None) -> cp.ndarray:
    """d(scores) = scale * probs * (g - sum(g * probs)), g = dprobs * mask (dropout), written over ``dprobs``."""
    dprobs = cp.ascontiguousarray(dprobs)
    if mask is not None:
        dprobs *= mask
    keys = dprobs.shape[-1]
    rows = dprobs.size // keys
    _launch_rows("attention_softmax", "orch_attention_softmax_grad", rows, dprobs.dtype,
                 (dprobs, cp.ascontiguousarray(probs), np.int32(rows), np.int32(keys), dprobs.dtype.type(scale)))
    return dprobs


def scatter_add_rows(target: cp.ndarray, indices: cp.ndarray, values: cp.ndarray) -> cp.ndarray:
    """target[indices[i]] += values[i] for every i (repeated indices add up, atomically); returns target."""
    add_at = getattr(cp.add, "at", None)
    if add_at is not None:
        add_at(target, indices, values)
    else:                                               # cupy < 13
        import cupyx

        cupyx.scatter_add(target, indices, values)
    return target


# --------------------------------------------------------------------------- optimizers
_sgd_kernel, _momentum_kernel, _rmsprop_kernel, _adam_kernel = (
    cp.ElementwiseKernel(*cuda_sources.OPTIMIZERS[rule], f"orch_{rule}", options=_OPTIONS)
    for rule in ("sgd", "momentum", "rmsprop", "adam"))


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


def sum_rows(x, out=None):
    """x [N, D] summed over its rows -> [D] (the numpy kernels use a GEMV)."""
    return cp.sum(x, axis=0, out=out)

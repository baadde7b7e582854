"""The engine's kernels on numpy: vectorized, in place where the caller allows it.

Same function names and semantics as ``kernels_cupy`` (where each is one fused
GPU kernel); models and optimizers call them through ``Backend.ops``. Arrays
may be float32 (training) or float64 (gradient checks); scalars are cast to the
array's dtype so float32 math stays float32.

Activations: "relu", and "gelu" in its tanh form
(0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), as ``tf.nn.gelu(approximate=True)``).
"""

from __future__ import annotations

import numpy as np

from orchestrator.engine import rng

ACTIVATIONS = ("relu", "gelu")
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


# --------------------------------------------------------------------------- dropout
def dropout_mask(seed: int, step: int, layer: int, example_offset: int,
                 shape: tuple[int, int], keep_prob: float, dtype) -> np.ndarray:
    """Scaled keep-mask [B, D]: 1/keep_prob where kept, 0 where dropped (see ``rng``)."""
    keep = rng.keep_mask(seed, step, layer, example_offset, shape[0], shape[1], keep_prob)
    return np.multiply(keep, np.dtype(dtype).type(1.0 / keep_prob), dtype=dtype)


def apply_mask(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """x * mask as a new array (x itself is the caller's data, never overwritten)."""
    return x.copy() if mask is None else np.multiply(x, mask)


# --------------------------------------------------------------------------- dense + activation
def bias_act_dropout(z: np.ndarray, bias: np.ndarray, activation: str,
                     mask: np.ndarray | None) -> np.ndarray:
    """z += bias (in place, kept for the backward pass); returns act(z) * mask."""
    np.add(z, bias, out=z)
    if activation == "relu":
        a = np.maximum(z, 0)
    elif activation == "gelu":
        a = _gelu(z)
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if mask is not None:
        np.multiply(a, mask, out=a)
    return a


def bias_act_dropout_grad(da: np.ndarray, z: np.ndarray, activation: str,
                          mask: np.ndarray | None) -> np.ndarray:
    """dL/dz = da * mask * act'(z), computed in place in ``da``."""
    if mask is not None:
        np.multiply(da, mask, out=da)
    if activation == "relu":
        np.multiply(da, z > 0, out=da)
    elif activation == "gelu":
        np.multiply(da, _gelu_grad(z), out=da)
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return da


def _gelu(z: np.ndarray) -> np.ndarray:
    t = np.tanh(_GELU_C * (z + _GELU_A * z * z * z))
    t += 1
    t *= z
    t *= 0.5
    return t


def _gelu_grad(z: np.ndarray) -> np.ndarray:
    z2 = z * z
    t = np.tanh(_GELU_C * (z + _GELU_A * z2 * z))
    # d/dz = 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2)
    inner = _GELU_C * (1 + 3 * _GELU_A * z2)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * inner


# --------------------------------------------------------------------------- loss
def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray,
                          grad_scale: float) -> tuple[float, int, np.ndarray]:
    """Sum of per-example softmax cross-entropy, number correct, and the gradient.

    The gradient (softmax - onehot) * grad_scale is written over ``logits``.
    """
    rows = np.arange(logits.shape[0])
    num_correct = int(np.count_nonzero(logits.argmax(axis=1) == labels))
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=logits)   # [B, C] shifted
    label_logit = logits[rows, labels]                                    # [B]
    np.exp(logits, out=logits)
    total = logits.sum(axis=1, keepdims=True)                             # [B, 1]
    loss_sum = float(np.sum(np.log(total[:, 0]) - label_logit, dtype=np.float64))
    scale = logits.dtype.type(grad_scale)
    np.multiply(logits, scale / total, out=logits)
    logits[rows, labels] -= scale
    return loss_sum, num_correct, logits


# --------------------------------------------------------------------------- optimizers
def sgd_update(var: np.ndarray, grad: np.ndarray, lr: float) -> None:
    """var -= lr * grad."""
    var -= var.dtype.type(lr) * grad


def momentum_update(var: np.ndarray, accum: np.ndarray, grad: np.ndarray,
                    lr: float, momentum: float) -> None:
    """TF ApplyMomentum: accum = accum * momentum + grad; var -= lr * accum."""
    t = var.dtype.type
    accum *= t(momentum)
    accum += grad
    var -= t(lr) * accum


def rmsprop_update(var: np.ndarray, ms: np.ndarray, mom: np.ndarray, grad: np.ndarray,
                   lr: float, decay: float, momentum: float, epsilon: float) -> None:
    """TF ApplyRMSProp: ms += (g^2 - ms)(1 - decay); mom = mom*momentum + lr*g/sqrt(ms+eps); var -= mom."""
    t = var.dtype.type
    scratch = np.multiply(grad, grad)
    scratch -= ms
    scratch *= t(1) - t(decay)                 # TF computes (1 - rho) in the variable's dtype
    ms += scratch
    np.add(ms, t(epsilon), out=scratch)
    np.sqrt(scratch, out=scratch)
    np.divide(grad, scratch, out=scratch)
    scratch *= t(lr)
    mom *= t(momentum)
    mom += scratch
    var -= mom


def adam_update(var: np.ndarray, m: np.ndarray, v: np.ndarray, grad: np.ndarray,
                lr_t: float, beta1: float, beta2: float, epsilon: float) -> None:
    """TF ApplyAdam with the bias-corrected rate lr_t:
    m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); var -= (m * lr_t) / (sqrt(v) + eps)."""
    t = var.dtype.type
    scratch = np.subtract(grad, m)
    scratch *= t(1) - t(beta1)
    m += scratch
    np.multiply(grad, grad, out=scratch)
    scratch -= v
    scratch *= t(1) - t(beta2)
    v += scratch
    denominator = np.sqrt(v)
    denominator += t(epsilon)
    np.multiply(m, t(lr_t), out=scratch)
    scratch /= denominator
    var -= scratch

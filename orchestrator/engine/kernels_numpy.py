"""The engine's kernels on numpy: vectorized, in place where the caller allows it.

Same function names and semantics as ``kernels_cupy`` (where each is one fused
GPU kernel); models and optimizers call them through ``Backend.ops``. Arrays
may be float32 (training) or float64 (gradient checks); scalars are cast to the
array's dtype so float32 math stays float32.

Activations: "relu", "tanh", and "gelu" in its tanh form
(0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), as ``tf.nn.gelu(approximate=True)``).
"""

from __future__ import annotations

import functools

import numpy as np

from orchestrator.engine import rng
from orchestrator.errors import InvalidArgumentError

ACTIVATIONS = ("relu", "gelu", "tanh")
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
    a = activation_forward(z, activation)
    if mask is not None:
        np.multiply(a, mask, out=a)
    return a


def activation_forward(z: np.ndarray, activation: str) -> np.ndarray:
    """act(z) as a new array (z is kept for the backward pass)."""
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "gelu":
        return _gelu(z)
    if activation == "tanh":
        return np.tanh(z)
    raise InvalidArgumentError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def bias_act_dropout_grad(da: np.ndarray, z: np.ndarray, activation: str,
                          mask: np.ndarray | None) -> np.ndarray:
    """dL/dz = da * mask * act'(z), computed in place in ``da``."""
    if mask is not None:
        np.multiply(da, mask, out=da)
    if activation == "relu":
        np.multiply(da, z > 0, out=da)
    elif activation == "gelu":
        np.multiply(da, _gelu_grad(z), out=da)
    elif activation == "tanh":
        t = np.tanh(z)
        np.multiply(t, t, out=t)
        np.subtract(1, t, out=t)                # 1 - tanh(z)^2
        np.multiply(da, t, out=da)
    else:
        raise InvalidArgumentError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return da


def _gelu_argument(z: np.ndarray) -> np.ndarray:
    """u = c (z + a z^3) = z (c + c a z^2), as a new array."""
    t = z.dtype.type
    u = np.multiply(z, z)
    u *= t(_GELU_C * _GELU_A)
    u += t(_GELU_C)
    u *= z
    return u


def _gelu(z: np.ndarray) -> np.ndarray:
    """0.5 z (1 + tanh(u)), one new array, every step in place."""
    a = _gelu_argument(z)
    np.tanh(a, out=a)
    a += 1
    a *= z
    a *= z.dtype.type(0.5)
    return a


def _gelu_grad(z: np.ndarray) -> np.ndarray:
    """d gelu / dz = 0.5 (1 + t) + 0.5 (1 - t^2) c z (1 + 3 a z^2), t = tanh(u)."""
    t_ = z.dtype.type
    slope = _gelu_argument(z)
    np.tanh(slope, out=slope)                       # t
    inner = np.multiply(z, z)
    inner *= t_(3 * _GELU_A * _GELU_C)
    inner += t_(_GELU_C)
    inner *= z                                      # c z (1 + 3 a z^2)
    square = np.multiply(slope, slope)
    np.subtract(1, square, out=square)              # 1 - t^2
    square *= inner
    slope += 1
    slope += square
    slope *= t_(0.5)
    return slope


# --------------------------------------------------------------------------- layer normalization
def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
               epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of x [N, D] normalized: (y = xhat * gamma + beta, xhat, rstd [N, 1]); x is not written."""
    t = x.dtype.type
    xhat = x - x.mean(axis=1, keepdims=True)
    var = np.einsum("ij,ij->i", xhat, xhat)[:, None]                  # [N, 1] sum of squares
    var *= t(1.0 / x.shape[1])
    var += t(epsilon)
    rstd = np.sqrt(var, out=var)
    np.divide(1, rstd, out=rstd)
    xhat *= rstd
    y = np.multiply(xhat, gamma)
    y += beta
    return y, xhat, rstd


def layer_norm_grad(dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray,
                    gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dgamma, dbeta) for ``layer_norm``; ``dy`` [N, D] is overwritten (it becomes dx)."""
    t = dy.dtype.type
    dgamma = np.einsum("ij,ij->j", dy, xhat)
    dbeta = dy.sum(axis=0)
    dy *= gamma                                                      # dxhat
    inv_d = t(1.0 / dy.shape[1])
    mean_dxhat = dy.sum(axis=1, keepdims=True)
    mean_dxhat *= inv_d
    mean_dxhat_xhat = np.einsum("ij,ij->i", dy, xhat)[:, None]
    mean_dxhat_xhat *= inv_d
    dy -= mean_dxhat                                                 # dx = rstd (dxhat - mean(dxhat)
    dy -= xhat * mean_dxhat_xhat                                     #        - xhat mean(dxhat xhat))
    dy *= rstd
    return dy, dgamma, dbeta


# --------------------------------------------------------------------------- attention softmax
@functools.lru_cache(maxsize=32)
def _causal_bias(queries: int, keys: int, dtype: np.dtype) -> np.ndarray:
    """[T, S]: 0 where query t may see key s (s <= t + S - T), -inf elsewhere."""
    bias = np.triu(np.full((queries, keys), -np.inf, dtype=dtype), k=1 + keys - queries)
    bias.flags.writeable = False
    return bias


def attention_softmax(scores: np.ndarray, scale: float, causal: bool) -> np.ndarray:
    """softmax(scale * scores) over the last axis, future keys masked when ``causal``; in place."""
    t = scores.dtype.type
    scores *= t(scale)
    if causal:
        scores += _causal_bias(scores.shape[-2], scores.shape[-1], scores.dtype)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def attention_softmax_grad(dprobs: np.ndarray, probs: np.ndarray, scale: float) -> np.ndarray:
    """d(scores) = scale * probs * (dprobs - sum(dprobs * probs)), written over ``dprobs``."""
    t = dprobs.dtype.type
    dot = np.einsum("...j,...j->...", dprobs, probs)[..., None]
    dprobs -= dot
    dprobs *= probs
    dprobs *= t(scale)
    return dprobs


# --------------------------------------------------------------------------- embedding
def scatter_add_rows(target: np.ndarray, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """target[indices[i]] += values[i] for every i (repeated indices add up); returns target.

    Rows are grouped by index (a stable sort) and each group summed by one ``add.reduceat``:
    5x faster than ``np.add.at``, and deterministic (the order depends on the indices only).
    """
    if not len(indices):
        return target
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    target[ordered[starts]] += np.add.reduceat(values[order], starts, axis=0)
    return target


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
# The update rules run every pass of their formula over a block of CHUNK elements at a time
# (all arrays raveled, views), so a block stays in the core's cache across the 6-11 passes
# instead of each pass streaming the whole (multi-MiB) variable from memory: 1.6-2x faster
# for the MLP's 784x625 kernel. Elementwise math is exact per element, so blocking changes
# no bit of the result.
CHUNK = 32768


def _blocks(*arrays: np.ndarray):
    """Flat views of ``arrays`` (same shape) cut into CHUNK-element blocks, zipped; the arrays
    themselves, as one block, when one is not C-contiguous (a flat view would be a copy)."""
    if not all(a.flags.c_contiguous for a in arrays) or arrays[0].size <= CHUNK:
        yield arrays
        return
    flat = [a.reshape(-1) for a in arrays]
    size = flat[0].size
    for start in range(0, size, CHUNK):
        yield [a[start:start + CHUNK] for a in flat]


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
    """TF ApplyRMSProp: ms += (g^2 - ms)(1 - decay); mom = mom*momentum + lr*g/sqrt(ms+eps); var -= mom.

    With momentum 0 the new mom is the step itself (TF's 0 * mom + step), written directly.
    """
    t = var.dtype.type
    one_minus_decay = t(1) - t(decay)          # TF computes (1 - rho) in the variable's dtype
    lr_, momentum_, epsilon_ = t(lr), t(momentum), t(epsilon)
    scratch = np.empty(min(var.size, CHUNK), var.dtype)
    for v, s, m, g in _blocks(var, ms, mom, grad):
        tmp = scratch[:v.size].reshape(v.shape)
        np.multiply(g, g, out=tmp)
        tmp -= s
        tmp *= one_minus_decay
        s += tmp
        np.add(s, epsilon_, out=tmp)
        np.sqrt(tmp, out=tmp)
        if momentum:
            np.divide(g, tmp, out=tmp)
            tmp *= lr_
            m *= momentum_
            m += tmp
        else:
            np.divide(g, tmp, out=m)
            m *= lr_
        v -= m


def adam_update(var: np.ndarray, m: np.ndarray, v: np.ndarray, grad: np.ndarray,
                lr_t: float, beta1: float, beta2: float, epsilon: float) -> None:
    """TF ApplyAdam with the bias-corrected rate lr_t:
    m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); var -= (m * lr_t) / (sqrt(v) + eps)."""
    t = var.dtype.type
    one_minus_b1, one_minus_b2 = t(1) - t(beta1), t(1) - t(beta2)
    lr_t_, epsilon_ = t(lr_t), t(epsilon)
    buffers = np.empty((2, min(var.size, CHUNK)), var.dtype)
    for w, m_, v_, g in _blocks(var, m, v, grad):
        scratch, denominator = buffers[0, :w.size].reshape(w.shape), buffers[1, :w.size].reshape(w.shape)
        np.subtract(g, m_, out=scratch)
        scratch *= one_minus_b1
        m_ += scratch
        np.multiply(g, g, out=scratch)
        scratch -= v_
        scratch *= one_minus_b2
        v_ += scratch
        np.sqrt(v_, out=denominator)
        denominator += epsilon_
        np.multiply(m_, lr_t_, out=scratch)
        scratch /= denominator
        w -= scratch

"""The engine's kernels on numpy: vectorized, in place where the caller allows it.

Same function names and semantics as ``kernels_cupy`` (where each is one fused
GPU kernel); models and optimizers call them through ``Backend.ops``. Arrays
may be float32 (training) or float64 (gradient checks); scalars are cast to the
array's dtype so float32 math stays float32.

Activations: "relu", "tanh", and "gelu" in its tanh form
(0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), as ``tf.nn.gelu(approximate=True)``).

Speed on a CPU (issue 13). numpy runs one pass per ufunc over the whole array, so a formula
of a dozen passes over a multi-MiB activation streams it from memory a dozen times. The
multi-pass kernels here (activations and their gradients, layer normalization, the attention
softmax, dropout masks, optimizer updates) instead run every pass on one block of about
``CHUNK`` elements (whole rows where a row is reduced) before the next block, so the passes
read cache. This changes no bit of any result: the math is elementwise, or reduces along a
row that is never split, so each element is computed by the same operations in the same
order whatever the block size (tests/engine/test_kernel_blocks.py).
"""

from __future__ import annotations

import functools

import numpy as np

from orchestrator.engine import rng
from orchestrator.errors import InvalidArgumentError

ACTIVATIONS = ("relu", "gelu", "tanh")
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715
CHUNK = 32768               # elements per block: a few arrays of it stay in a core's L2
PHILOX_CHUNK = 4 * CHUNK    # dropout units per block: Philox makes ~50 ufunc calls per block


# --------------------------------------------------------------------------- blocks
def _row_blocks(rows: int, width: int, chunk: int | None = None) -> list[slice]:
    """Slices of range(rows) holding about ``chunk`` (default ``CHUNK``, read at each call) elements each."""
    step = max(1, (CHUNK if chunk is None else chunk) // max(width, 1))
    return [slice(row, min(row + step, rows)) for row in range(0, rows, step)]


def _as_rows(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array as [N, D] (a view)."""
    return array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)


def _by_rows(rows: int, width: int, body, chunk: int | None = None) -> None:
    """``body(row_slice)`` for every block of rows, in order."""
    for block in _row_blocks(rows, width, chunk):
        body(block)


# --------------------------------------------------------------------------- dropout
def dropout_mask(seed: int, step: int, layer: int, example_offset: int,
                 shape: tuple[int, int], keep_prob: float, dtype, blocks: np.ndarray | None = None) -> np.ndarray:
    """Scaled keep-mask [B, D]: 1/keep_prob where kept, 0 where dropped (see ``rng``).

    Drawn in blocks of examples (each example's bits depend on its global index only).
    ``blocks`` (sorted Philox block indices ``unit // 8``; D a multiple of 8): draw only the units
    of those blocks, each exactly as a full draw would, and leave every other unit 0. For callers
    whose other units only ever multiply zeros (attention probabilities above the causal
    diagonal), where any value there gives the same products (the cupy kernel draws them all).
    """
    if blocks is not None:
        return _dropout_mask_blocks(seed, step, layer, example_offset, shape, keep_prob, dtype, blocks)
    batch, units = shape
    mask = np.empty((batch, units), dtype=dtype)
    scale = mask.dtype.type(1.0 / keep_prob)

    def body(rows: slice) -> None:
        keep = rng.keep_mask(seed, step, layer, example_offset + rows.start, rows.stop - rows.start, units,
                             keep_prob)
        np.multiply(keep, scale, out=mask[rows])

    _by_rows(batch, units, body, PHILOX_CHUNK)
    return mask


def _dropout_mask_blocks(seed: int, step: int, layer: int, example_offset: int, shape: tuple[int, int],
                         keep_prob: float, dtype, blocks: np.ndarray) -> np.ndarray:
    batch, units = shape
    per_block = rng.UNITS_PER_BLOCK
    if units % per_block:
        raise InvalidArgumentError(f"dropout_mask: blocks need a multiple of {per_block} units, got {units}")
    mask = np.zeros((batch, units // per_block, per_block), dtype=dtype)
    scale = mask.dtype.type(1.0 / keep_prob)
    block_item = np.dtype(f"V{per_block * mask.itemsize}")               # one block's units as one item
    items = mask.view(block_item).reshape(batch, -1)                        # [B, D / 8]
    groups = items.shape[1]

    def body(rows: slice) -> None:
        count = rows.stop - rows.start
        keep = rng.keep_mask(seed, step, layer, example_offset + rows.start, count, 0, keep_prob, blocks)
        drawn = np.multiply(keep, scale)                                    # [n, 8 * len(blocks)]
        where = (np.arange(count)[:, None] * groups + blocks).reshape(-1)
        np.put(items[rows], where, drawn.view(block_item))                  # 3x faster than mask[:, blocks] =

    _by_rows(batch, len(blocks) * per_block, body, PHILOX_CHUNK)
    return mask.reshape(batch, units)


def apply_mask(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """x * mask as a new array (x itself is the caller's data, never overwritten)."""
    if mask is None:
        return x.copy()
    if not (x.flags.c_contiguous and mask.flags.c_contiguous and x.shape == mask.shape):
        return np.multiply(x, mask)
    out = np.empty(x.shape, np.result_type(x, mask))
    x2, mask2, out2 = _as_rows(x), _as_rows(mask), _as_rows(out)
    _by_rows(*x2.shape, lambda rows: np.multiply(x2[rows], mask2[rows], out=out2[rows]))
    return out


# --------------------------------------------------------------------------- dense + activation
def bias_act_dropout(z: np.ndarray, bias: np.ndarray, activation: str,
                     mask: np.ndarray | None) -> np.ndarray:
    """z += bias (in place, kept for the backward pass); returns act(z) * mask."""
    _check_activation(activation)
    out = np.empty_like(z)
    z2 = _as_rows(z)
    out2, mask2 = out.reshape(z2.shape), None if mask is None else mask.reshape(z2.shape)

    def body(rows: slice) -> None:
        zb, ob = z2[rows], out2[rows]
        np.add(zb, bias, out=zb)
        _activation_into(zb, activation, ob)
        if mask2 is not None:
            np.multiply(ob, mask2[rows], out=ob)

    _by_rows(*z2.shape, body)
    return out


def activation_forward(z: np.ndarray, activation: str) -> np.ndarray:
    """act(z) as a new array (z is kept for the backward pass)."""
    _check_activation(activation)
    z2 = _as_rows(np.ascontiguousarray(z))
    out = np.empty(z.shape, z.dtype)
    out2 = out.reshape(z2.shape)
    _by_rows(*z2.shape, lambda rows: _activation_into(z2[rows], activation, out2[rows]))
    return out


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _activation_into(z: np.ndarray, activation: str, out: np.ndarray) -> None:
    if activation == "relu":
        np.maximum(z, 0, out=out)
    elif activation == "gelu":
        _gelu_into(z, out)
    else:
        np.tanh(z, out=out)


def bias_act_dropout_grad(da: np.ndarray, z: np.ndarray, activation: str,
                          mask: np.ndarray | None) -> np.ndarray:
    """dL/dz = da * mask * act'(z), computed in place in ``da`` (C-contiguous)."""
    _check_activation(activation)
    da2 = _as_rows(da)
    z2 = np.ascontiguousarray(z).reshape(da2.shape)
    mask2 = None if mask is None else mask.reshape(da2.shape)
    scratch = []

    def body(rows: slice) -> None:
        db, zb = da2[rows], z2[rows]
        if mask2 is not None:
            np.multiply(db, mask2[rows], out=db)
        if activation == "relu":
            np.multiply(db, zb > 0, out=db)
            return
        if not scratch:
            scratch.append(np.empty((3, *zb.shape), z.dtype))      # the first block is the largest
        slope, inner, square = (buffer[:zb.shape[0]] for buffer in scratch[0])
        if activation == "gelu":
            _gelu_grad_into(zb, slope, inner, square)
        else:
            np.tanh(zb, out=slope)
            np.multiply(slope, slope, out=slope)
            np.subtract(1, slope, out=slope)                 # 1 - tanh(z)^2
        np.multiply(db, slope, out=db)

    _by_rows(*da2.shape, body)
    return da


def _gelu_argument_into(z: np.ndarray, u: np.ndarray) -> np.ndarray:
    """u = c (z + a z^3) = z (c + c a z^2), written into ``u``."""
    t = z.dtype.type
    np.multiply(z, z, out=u)
    u *= t(_GELU_C * _GELU_A)
    u += t(_GELU_C)
    u *= z
    return u


def _gelu_into(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """0.5 z (1 + tanh(u)) into ``out``, every step in place."""
    _gelu_argument_into(z, out)
    np.tanh(out, out=out)
    out += 1
    out *= z
    out *= z.dtype.type(0.5)
    return out


def _gelu_grad_into(z: np.ndarray, slope: np.ndarray, inner: np.ndarray, square: np.ndarray) -> np.ndarray:
    """d gelu / dz = 0.5 (1 + t) + 0.5 (1 - t^2) c z (1 + 3 a z^2), t = tanh(u), into ``slope``."""
    t_ = z.dtype.type
    np.multiply(z, z, out=square)                   # z^2, for both u and the inner factor
    np.multiply(square, t_(_GELU_C * _GELU_A), out=slope)
    slope += t_(_GELU_C)
    slope *= z                                      # u, as _gelu_argument_into computes it
    np.tanh(slope, out=slope)                       # t
    np.multiply(square, t_(3 * _GELU_A * _GELU_C), out=inner)
    inner += t_(_GELU_C)
    inner *= z                                      # c z (1 + 3 a z^2)
    np.multiply(slope, slope, out=square)
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
    inv_d, eps = t(1.0 / x.shape[1]), t(epsilon)
    y, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty((x.shape[0], 1), x.dtype)

    def body(rows: slice) -> None:
        xb, hb, rb, yb = x[rows], xhat[rows], rstd[rows], y[rows]
        mean = sum_last(xb)
        mean *= inv_d
        np.subtract(xb, mean[:, None], out=hb)
        np.einsum("ij,ij->i", hb, hb, out=rb[:, 0])               # sum of squares per row
        rb *= inv_d
        rb += eps
        np.sqrt(rb, out=rb)
        np.divide(1, rb, out=rb)
        hb *= rb
        np.multiply(hb, gamma, out=yb)
        yb += beta

    _by_rows(*x.shape, body)
    return y, xhat, rstd


def layer_norm_grad(dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray,
                    gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dgamma, dbeta) for ``layer_norm``; ``dy`` [N, D] is overwritten (it becomes dx)."""
    t = dy.dtype.type
    dgamma = np.einsum("ij,ij->j", dy, xhat)                          # sums over rows: whole arrays
    dbeta = sum_rows(dy)
    inv_d = t(1.0 / dy.shape[1])

    def body(rows: slice) -> None:
        db, hb = dy[rows], xhat[rows]
        db *= gamma                                                  # dxhat
        mean_dxhat = sum_last(db)[:, None]
        mean_dxhat *= inv_d
        mean_dxhat_xhat = np.einsum("ij,ij->i", db, hb)[:, None]
        mean_dxhat_xhat *= inv_d
        db -= mean_dxhat                                             # dx = rstd (dxhat - mean(dxhat)
        db -= hb * mean_dxhat_xhat                                   #        - xhat mean(dxhat xhat))
        db *= rstd[rows]

    _by_rows(*dy.shape, body)
    return dy, dgamma, dbeta


# --------------------------------------------------------------------------- attention softmax
@functools.lru_cache(maxsize=32)
def causal_visible(queries: int, keys: int) -> np.ndarray:
    """[T, S] bool: True where query t may see key s (s <= t + S - T): the one causal rule, read by
    the softmax's bias below and by the attention layer choosing which dropout blocks to draw."""
    visible = np.tril(np.ones((queries, keys), dtype=bool), k=keys - queries)
    visible.flags.writeable = False
    return visible


@functools.lru_cache(maxsize=32)
def _causal_bias(queries: int, keys: int, dtype: np.dtype) -> np.ndarray:
    """[T, S]: 0 where the query may see the key (``causal_visible``), -inf elsewhere."""
    bias = np.where(causal_visible(queries, keys), dtype.type(0), dtype.type(-np.inf)).astype(dtype)
    bias.flags.writeable = False
    return bias


def attention_softmax(scores: np.ndarray, scale: float, causal: bool,
                      mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """softmax(scale * scores) over the last axis, future keys masked when ``causal``, in place;
    returns (probs, dropped): dropped = probs * mask (dropout, a new array), or probs without a mask.

    Blocks are whole [T, S] score matrices (the causal bias lines up with every block), and the
    dropout product is taken per block while it is in cache. The row maxima are taken over a
    transposed copy of the block, [S, T], reduced over its first axis: numpy's row max over a
    64-wide row is a horizontal reduction per row (90 ns a row), the transposed one elementwise
    maxima of contiguous rows; 2x faster with the copy, and the same values (a maximum is exact
    whatever the order).
    """
    t = scores.dtype.type
    queries, keys = scores.shape[-2:]
    bias = _causal_bias(queries, keys, scores.dtype) if causal else None
    matrices = scores.reshape(-1, queries, keys)
    dropped = scores if mask is None else np.empty(scores.shape, np.result_type(scores, mask))
    masks, outs = (None, None) if mask is None else (mask.reshape(matrices.shape), dropped.reshape(matrices.shape))
    blocks = _row_blocks(matrices.shape[0], queries * keys)
    count = blocks[0].stop - blocks[0].start if blocks else 0                # the first block is the largest
    transposed = np.empty((count, keys, queries), scores.dtype)
    top = np.empty((count, 1, queries), scores.dtype)
    row_sums = np.empty(count * queries, scores.dtype)

    for block in blocks:
        sb = matrices[block]
        size = sb.shape[0]
        if scale != 1.0:
            sb *= t(scale)
        if bias is not None:
            sb += bias
        np.copyto(transposed[:size], sb.transpose(0, 2, 1))
        np.maximum.reduce(transposed[:size], axis=1, out=top[:size, 0])
        sb -= top[:size].transpose(0, 2, 1)                                 # [n, T, 1]: row maxima
        np.exp(sb, out=sb)
        sums = sum_last(sb.reshape(-1, keys), out=row_sums[:size * queries])
        np.divide(1, sums, out=sums)
        sb *= sums.reshape(size, queries, 1)
        if masks is not None:
            np.multiply(sb, masks[block], out=outs[block])
    return scores, dropped


def attention_softmax_grad(dprobs: np.ndarray, probs: np.ndarray, scale: float,
                           mask: np.ndarray | None = None) -> np.ndarray:
    """d(scores) = scale * probs * (g - sum(g * probs)), g = dprobs * mask (dropout), written over ``dprobs``."""
    t = dprobs.dtype.type
    d2, p2 = _as_rows(dprobs), _as_rows(probs)
    m2 = None if mask is None else _as_rows(mask)

    def body(rows: slice) -> None:
        db, pb = d2[rows], p2[rows]
        if m2 is not None:
            db *= m2[rows]
        db -= np.einsum("ij,ij->i", db, pb)[:, None]
        db *= pb
        if scale != 1.0:
            db *= t(scale)

    _by_rows(*d2.shape, body)
    return dprobs


# --------------------------------------------------------------------------- column sums
@functools.lru_cache(maxsize=64)
def _ones(count: int, dtype: np.dtype) -> np.ndarray:
    ones = np.ones(count, dtype=dtype)
    ones.flags.writeable = False
    return ones


def sum_last(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x [N, D] summed along each row -> [N].

    ``einsum("ij->i")`` runs one contiguous, unrolled loop per row: 4x faster than
    ``x.sum(axis=1)`` on layer norm's or attention's 64-wide rows (12 vs 49 us for 2048 rows).
    Not a GEMV ``x @ ones``, which is faster still but sums a row differently depending on
    how many rows come with it; here a row's sum depends on that row only, so blocks and
    batch splits give the same bits.
    """
    return np.einsum("ij->i", x, out=out)


def sum_rows(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x [N, D] summed over its rows -> [D] (bias gradients), as a BLAS product ``ones @ x``.

    numpy's ``x.sum(axis=0)`` on narrow rows (a conv layer's [B*H*W, 16]) runs one short
    inner loop per row: 5-15x slower than the GEMV.
    """
    return np.matmul(_ones(x.shape[0], x.dtype), x, out=out)


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
    best = logits.argmax(axis=1)
    num_correct = int(np.count_nonzero(best == labels))
    np.subtract(logits, logits[rows, best][:, None], out=logits)          # [B, C] shifted by the row maxima
    label_logit = logits[rows, labels]                                    # [B]
    np.exp(logits, out=logits)
    total = sum_last(logits)[:, None]                                     # [B, 1]
    loss_sum = float(np.sum(np.log(total[:, 0]) - label_logit, dtype=np.float64))
    scale = logits.dtype.type(grad_scale)
    np.multiply(logits, scale / total, out=logits)
    logits[rows, labels] -= scale
    return loss_sum, num_correct, logits


# --------------------------------------------------------------------------- optimizers
# The update rules run all their passes per block of CHUNK elements (1.6-2x faster for the
# MLP's 784x625 kernel than whole-array passes, which stream it from memory each time).
def _update(body, *arrays: np.ndarray) -> None:
    """``body(*blocks, scratch)`` over the CHUNK-element blocks of ``arrays``, in order.

    Not C-contiguous (never the engine's own arrays): the whole arrays as one block.
    """
    if not all(a.flags.c_contiguous for a in arrays):
        body(*arrays, np.empty((2, *arrays[0].shape), arrays[0].dtype))
        return
    size = arrays[0].size
    flat = [a.reshape(-1) for a in arrays]
    scratch = np.empty((2, min(size, CHUNK)), arrays[0].dtype)
    for start in range(0, size, CHUNK):
        block = slice(start, min(start + CHUNK, size))
        body(*(a[block] for a in flat), scratch[:, :block.stop - block.start])


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

    def body(v, s, m, g, scratch):
        tmp = scratch[0]
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

    _update(body, var, ms, mom, grad)


def adam_update(var: np.ndarray, m: np.ndarray, v: np.ndarray, grad: np.ndarray,
                lr_t: float, beta1: float, beta2: float, epsilon: float) -> None:
    """TF ApplyAdam with the bias-corrected rate lr_t:
    m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); var -= (m * lr_t) / (sqrt(v) + eps)."""
    t = var.dtype.type
    one_minus_b1, one_minus_b2 = t(1) - t(beta1), t(1) - t(beta2)
    lr_t_, epsilon_ = t(lr_t), t(epsilon)

    def body(w, m_, v_, g, scratch):
        step, denominator = scratch[0], scratch[1]
        np.subtract(g, m_, out=step)
        step *= one_minus_b1
        m_ += step
        np.multiply(g, g, out=step)
        step -= v_
        step *= one_minus_b2
        v_ += step
        np.sqrt(v_, out=denominator)
        denominator += epsilon_
        np.multiply(m_, lr_t_, out=step)
        step /= denominator
        w -= step

    _update(body, var, m, v, grad)

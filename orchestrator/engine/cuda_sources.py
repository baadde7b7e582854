"""CUDA C sources of the cupy kernels, as plain strings.

Kept apart from ``kernels_cupy`` (which needs cupy and a GPU) so they can be compiled
by ``nvcc`` on a machine without either (``tests/engine/test_cuda_sources.py``): a typo
in a kernel nobody could run here fails a test instead of a user's first GPU step.

Elementwise kernels are ``(in_params, out_params, operation)`` triples for
``cupy.ElementwiseKernel`` (type ``T``; ``i`` is the element index). ``ACT_FORWARD[name]``
defines ``act`` from ``v``; ``ACT_GRAD[name]`` defines ``slope`` (= act'(z)) from ``z``.
The ``RAW_*`` sources are templates instantiated for float and double.
"""

from __future__ import annotations

GELU_DEFS = "const T gelu_c = (T)0.7978845608028654; const T gelu_a = (T)0.044715;"
ACT_FORWARD = {
    "relu": "T act = v > (T)0 ? v : (T)0;",
    "gelu": GELU_DEFS + "T act = (T)0.5 * (v * ((T)1 + tanh(gelu_c * (v + gelu_a * v * v * v))));",
    "tanh": "T act = tanh(v);",
}
ACT_GRAD = {
    "relu": "T slope = z > (T)0 ? (T)1 : (T)0;",
    "gelu": GELU_DEFS + (
        "T z2 = z * z; T t = tanh(gelu_c * (z + gelu_a * z2 * z));"
        "T inner = gelu_c * ((T)1 + (T)3 * gelu_a * z2);"
        "T slope = (T)0.5 * ((T)1 + t) + (T)0.5 * z * ((T)1 - t * t) * inner;"),
    "tanh": "T th = tanh(z); T slope = (T)1 - th * th;",
}



def bias_act(activation: str, masked: bool) -> tuple[str, str, str]:
    """z += bias (kept), a = act(z) [* mask]."""
    return ("T bias" + (", T mask" if masked else ""), "T z, T a",
            "T v = z + bias; z = v; " + ACT_FORWARD[activation] + " a = act" + (" * mask;" if masked else ";"))


def act_grad(activation: str, masked: bool) -> tuple[str, str, str]:
    """da = da [* mask] * act'(z), in place."""
    return ("T z" + (", T mask" if masked else ""), "T da",
            ACT_GRAD[activation] + ("da = da * mask; " if masked else "") + " da = da * slope;")


def act(activation: str) -> tuple[str, str, str]:
    """a = act(v) into a new array."""
    return "T v", "T a", ACT_FORWARD[activation] + " a = act;"


# Preamble: rng.CUDA_PHILOX_SOURCE.
DROPOUT_MASK = (
    "uint64 seed, uint64 step, uint32 layer, int64 example_offset, int64 units, uint32 threshold, T scale",
    "T mask",
    """
    long long row = i / units;
    unsigned int unit = (unsigned int)(i % units);
    unsigned long long example = (unsigned long long)(example_offset + row);
    mask = orch_dropout_keep(seed, step, layer, example, unit, threshold) ? scale : (T)0;
    """)

OPTIMIZERS = {
    "sgd": ("T grad, T lr", "T var", "var = var - lr * grad;"),
    "momentum": ("T grad, T lr, T momentum", "T var, T accum",
                 "T acc = accum * momentum; acc = acc + grad; accum = acc; var = var - lr * acc;"),
    "rmsprop": ("T grad, T lr, T one_minus_decay, T momentum, T epsilon", "T var, T ms, T mom", """
    T s = grad * grad; s = s - ms; s = s * one_minus_decay;
    T new_ms = ms + s; ms = new_ms;
    T step = grad / sqrt(new_ms + epsilon); step = step * lr;
    T new_mom = mom * momentum; new_mom = new_mom + step; mom = new_mom;
    var = var - new_mom;
    """),
    "adam": ("T grad, T lr_t, T one_minus_beta1, T one_minus_beta2, T epsilon", "T var, T m, T v", """
    T dm = grad - m; dm = dm * one_minus_beta1; T new_m = m + dm; m = new_m;
    T dv = grad * grad; dv = dv - v; dv = dv * one_minus_beta2; T new_v = v + dv; v = new_v;
    T step = new_m * lr_t; step = step / (sqrt(new_v) + epsilon);
    var = var - step;
    """),
}

RAW_SOFTMAX_XENT = r"""
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

# One warp per row: lanes stride over the row, sums meet by butterfly shuffles. Every lane of
# a warp works on the same row, so a warp past the last row returns as a whole.
_WARP_SUM = r"""
template<typename T>
__device__ __forceinline__ T orch_warp_sum(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}
template<typename T>
__device__ __forceinline__ T orch_warp_max(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T other = __shfl_xor_sync(0xffffffffu, value, offset);
        value = other > value ? other : value;
    }
    return value;
}
"""

RAW_LAYER_NORM = _WARP_SUM + r"""
template<typename T>
__global__ void orch_layer_norm(const T* x, const T* gamma, const T* beta, T* y, T* xhat, T* rstd,
                                const int rows, const int cols, const T epsilon) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long base = (long long)row * cols;
    T sum = (T)0;
    for (int j = lane; j < cols; j += 32) sum += x[base + j];
    const T mean = orch_warp_sum(sum) / (T)cols;
    T squares = (T)0;
    for (int j = lane; j < cols; j += 32) { const T d = x[base + j] - mean; squares += d * d; }
    const T r = (T)1 / sqrt(orch_warp_sum(squares) / (T)cols + epsilon);
    for (int j = lane; j < cols; j += 32) {
        const T h = (x[base + j] - mean) * r;
        xhat[base + j] = h;
        y[base + j] = h * gamma[j] + beta[j];
    }
    if (lane == 0) rstd[row] = r;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma; written over dy.
template<typename T>
__global__ void orch_layer_norm_grad(T* dy, const T* xhat, const T* rstd, const T* gamma,
                                     const int rows, const int cols) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long base = (long long)row * cols;
    T sum_g = (T)0, sum_gx = (T)0;
    for (int j = lane; j < cols; j += 32) {
        const T g = dy[base + j] * gamma[j];
        sum_g += g;
        sum_gx += g * xhat[base + j];
    }
    const T mean_g = orch_warp_sum(sum_g) / (T)cols;
    const T mean_gx = orch_warp_sum(sum_gx) / (T)cols;
    const T r = rstd[row];
    for (int j = lane; j < cols; j += 32) {
        const T g = dy[base + j] * gamma[j];
        dy[base + j] = r * (g - mean_g - xhat[base + j] * mean_gx);
    }
}
"""

# Rows of [..., T, S] scores; row index % T is the query position t. With ``causal``, key s is
# visible when s <= t + S - T (key 0 always is, so every row has a finite maximum).
RAW_ATTENTION_SOFTMAX = _WARP_SUM + r"""
template<typename T>
__global__ void orch_attention_softmax(T* scores, const int rows, const int queries, const int keys,
                                       const T scale, const int causal) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    T* s = scores + (long long)row * keys;
    const int last = causal ? (row % queries) + keys - queries : keys - 1;
    T top = s[0] * scale;
    for (int j = lane; j <= last; j += 32) { const T v = s[j] * scale; top = v > top ? v : top; }
    top = orch_warp_max(top);
    T total = (T)0;
    for (int j = lane; j < keys; j += 32) {
        const T e = j <= last ? exp(s[j] * scale - top) : (T)0;
        s[j] = e;
        total += e;
    }
    const T inverse = (T)1 / orch_warp_sum(total);
    for (int j = lane; j < keys; j += 32) s[j] = s[j] * inverse;
}

// d(scores) = scale * probs * (dprobs - sum(dprobs * probs)), written over dprobs.
template<typename T>
__global__ void orch_attention_softmax_grad(T* dprobs, const T* probs, const int rows, const int keys,
                                            const T scale) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long base = (long long)row * keys;
    T dot = (T)0;
    for (int j = lane; j < keys; j += 32) dot += dprobs[base + j] * probs[base + j];
    dot = orch_warp_sum(dot);
    for (int j = lane; j < keys; j += 32) dprobs[base + j] = scale * probs[base + j] * (dprobs[base + j] - dot);
}
"""

RAW_SOURCES = {
    "softmax_xent": (RAW_SOFTMAX_XENT, ("orch_softmax_xent",)),
    "layer_norm": (RAW_LAYER_NORM, ("orch_layer_norm", "orch_layer_norm_grad")),
    "attention_softmax": (RAW_ATTENTION_SOFTMAX, ("orch_attention_softmax", "orch_attention_softmax_grad")),
}

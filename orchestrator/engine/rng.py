"""Counter-based random bits for dropout: Philox4x32-10, identical on numpy and CUDA.

A dropout mask must be a pure function of *where* it is drawn, not of how many
numbers were drawn before, so that M workers (each holding a slice of the
global batch) and a resumed run draw exactly the masks one uninterrupted
process would. Philox (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC'11) gives 4 x 32 random bits per 128-bit counter under a 64-bit key.

Counter layout (one Philox block = 4 x 32 bits = 8 x 16 bits serves 8 consecutive
units of one example):

    key     = (seed mod 2**32, (seed >> 32) mod 2**32)
    counter = (unit // 8, global example index mod 2**32, step mod 2**32, layer)
    word    = output word (unit % 8) // 2 of philox4x32_10(counter, key)
    bits    = low 16 bits of word for even units, high 16 bits for odd units

A unit is kept when ``bits < keep_threshold(keep_prob)`` (keep_prob quantized to
1/65536; 16 bits per unit halve the generator's work): an integer compare, so
numpy and the CUDA kernel (``CUDA_PHILOX_SOURCE``, the same rounds with
``__umulhi``) make the same decision for every element.
"""

from __future__ import annotations

import sys

import numpy as np

from orchestrator.errors import InvalidArgumentError

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
UNITS_PER_BLOCK = 8  # 16 random bits per unit
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS) -> tuple[np.ndarray, ...]:
    """Philox4x32 on broadcastable arrays of 32-bit words (held in uint64).

    ``counter`` is four arrays/ints (c0..c3), ``key`` two (k0, k1); returns the four
    output words as uint64 arrays holding values < 2**32.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (int(k) & 0xFFFFFFFF for k in key)
    for _ in range(rounds):
        c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, k0, k1)
        k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _philox_round(c0, c1, c2, c3, k0: int, k1: int):
    product0 = c0 * np.uint64(PHILOX_M0)  # < 2**64: exact in uint64
    product1 = c2 * np.uint64(PHILOX_M1)
    hi0, lo0 = product0 >> _SHIFT32, product0 & _MASK32
    hi1, lo1 = product1 >> _SHIFT32, product1 & _MASK32
    return hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0


def keep_threshold(keep_prob: float) -> int:
    """The 16-bit t with P(bits16 < t) = t / 2**16 ~ keep_prob (keep_prob is quantized to 1/65536)."""
    if not 0.0 < keep_prob <= 1.0:
        raise InvalidArgumentError(f"keep_prob must be in (0, 1], got {keep_prob}")
    return max(1, min(int(keep_prob * 65536.0), 65535))


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key words for a (up to 64-bit) seed."""
    seed = int(seed)
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def random_bits(seed: int, step: int, layer: int, example_offset: int,
                batch: int, units: int, blocks: np.ndarray | None = None) -> np.ndarray:
    """uint16 bits [batch, units] for examples ``example_offset + i`` and units ``j``.

    With ``blocks`` (Philox block indices, i.e. ``unit // 8``), only those blocks are drawn:
    bits [batch, 8 * len(blocks)], block ``blocks[g]``'s 8 units at columns 8g .. 8g + 7, each
    the same bits as the full draw gives that unit (``units`` is then unused).
    """
    if blocks is None:
        groups = (units + UNITS_PER_BLOCK - 1) // UNITS_PER_BLOCK
        unit_group = np.arange(groups, dtype=np.uint64)[None, :]                                # [1, G]
    else:
        groups = len(blocks)
        unit_group = np.asarray(blocks, dtype=np.uint64)[None, :]                              # [1, G]
        units = groups * UNITS_PER_BLOCK
    example = np.arange(example_offset, example_offset + batch, dtype=np.uint64)[:, None] & _MASK32  # [B, 1]
    counter = (unit_group, example, int(step) & 0xFFFFFFFF, int(layer) & 0xFFFFFFFF)
    words = np.empty((batch, groups, 4), dtype=np.uint32)                                       # [B, G, 4]
    for lane, word in enumerate(_philox_full(counter, seed_key(seed), (batch, groups))):
        words[:, :, lane] = word
    # little-endian halves: 16-bit value 2w is the low half of word w, 2w + 1 the high half
    return words.view(np.uint16).reshape(batch, groups * UNITS_PER_BLOCK)[:, :units]


def _philox_full(counter, key, shape) -> tuple[np.ndarray, ...]:
    """``philox4x32`` for a counter that broadcasts to ``shape``: the four words as uint32 arrays (views).

    The first 2 rounds run on the broadcast operands (cheap: rows or columns), the
    rest on full arrays, both multiply lanes at once: ``C`` = [c0; c2] lives in the low
    halves of a uint64 buffer whose high halves stay zero, so one uint64 multiply by
    [M0; M1] (no cast) gives both 64-bit products; their uint32 hi/lo halves are read as
    strided views (no shift or mask), and c0 = hi1 ^ c1 ^ k0, c2 = hi0 ^ c3 ^ k1 is two
    xors over both lanes (the hi halves taken in reverse lane order). 3 ufunc passes per
    round; products alternate between two buffers so the lo halves carried into the next
    round (c1, c3) are not overwritten while still needed.
    """
    k0, k1 = key
    c0, c1, c2, c3 = philox4x32(counter, key, rounds=_BROADCAST_ROUNDS)
    for _ in range(_BROADCAST_ROUNDS):
        k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
    lanes = (2, *shape)
    column = (2, *([1] * len(shape)))
    c = np.zeros(lanes, np.uint64)                     # [c0; c2], values < 2**32
    c[0], c[1] = np.broadcast_to(c0, shape), np.broadcast_to(c2, shape)
    c_low = _halves(c)[0]                              # where the xors write (high halves stay 0)
    d = np.empty(lanes, np.uint32)                     # [c1; c3]
    d[0], d[1] = np.broadcast_to(c1, shape), np.broadcast_to(c3, shape)
    multipliers = np.array([PHILOX_M0, PHILOX_M1], np.uint64).reshape(column)
    products = (np.empty(lanes, np.uint64), np.empty(lanes, np.uint64))
    for index in range(PHILOX_ROUNDS - _BROADCAST_ROUNDS):
        product = products[index % 2]
        np.multiply(c, multipliers, out=product)       # [c0 * M0; c2 * M1]
        low, high = _halves(product)
        np.bitwise_xor(high[::-1], d, out=c_low)       # [hi1 ^ c1; hi0 ^ c3]
        np.bitwise_xor(c_low, np.array([k0, k1], np.uint32).reshape(column), out=c_low)
        d = low[::-1]                                  # [lo1; lo0]: the new c1, c3
        k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c_low[0], d[0], c_low[1], d[1]


_BROADCAST_ROUNDS = 2      # after 2 rounds every word depends on both the unit and the example
_LOW = 0 if sys.byteorder == "little" else 1


def _halves(product: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) 32-bit halves of a uint64 array, as uint32 views."""
    pairs = product.view(np.uint32).reshape(*product.shape, 2)
    return pairs[..., _LOW], pairs[..., 1 - _LOW]


def keep_mask(seed: int, step: int, layer: int, example_offset: int,
              batch: int, units: int, keep_prob: float, blocks: np.ndarray | None = None) -> np.ndarray:
    """Boolean dropout keep-mask [batch, units] (True = unit kept); ``blocks`` as in ``random_bits``."""
    threshold = np.uint16(keep_threshold(keep_prob))
    return random_bits(seed, step, layer, example_offset, batch, units, blocks) < threshold


PLUGIN_STREAM_BIT = 0x80000000  # plug-in streams never collide with the built-in dropout layer ids


def uniform(seed: int, step: int, example_offset: int, shape, stream: int = 0,
            dtype=np.float32) -> np.ndarray:
    """Uniform [0, 1) values of ``shape`` = (batch, ...) for global examples ``example_offset + i``.

    The public randomness helper for plug-in models: row ``i`` is a pure function of
    ``(seed, step, stream, example_offset + i)``, so M workers that each hold a slice of the
    global batch, and a resumed run, draw exactly what one uninterrupted process draws.
    ``stream`` (0 .. 2**31 - 1) separates independent uses within one step (e.g. one per
    dropout layer). Counter layout: ``(unit // 4, example, step, stream | 2**31)``, one
    32-bit Philox word per unit; float32 values keep the top 24 bits, float64 all 32.
    """
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ValueError("uniform: shape must start with the batch dimension")
    if not 0 <= int(stream) < PLUGIN_STREAM_BIT:
        raise ValueError(f"uniform: stream must be in [0, 2**31), got {stream}")
    batch, units = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    words = _words32(seed, step, int(stream) | PLUGIN_STREAM_BIT, example_offset, batch, units)
    if np.dtype(dtype) == np.float32:
        values = (words >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    else:
        values = words.astype(np.dtype(dtype)) * np.dtype(dtype).type(1.0 / (1 << 32))
    return values.reshape(shape)


def _words32(seed: int, step: int, stream: int, example_offset: int, batch: int, units: int) -> np.ndarray:
    """uint32 [batch, units]: word ``unit % 4`` of block ``unit // 4`` of each example."""
    groups = (max(units, 1) + 3) // 4
    unit_group = np.arange(groups, dtype=np.uint64)[None, :]                                    # [1, G]
    example = np.arange(example_offset, example_offset + batch, dtype=np.uint64)[:, None] & _MASK32  # [B, 1]
    counter = (unit_group, example, int(step) & 0xFFFFFFFF, stream & 0xFFFFFFFF)
    words = np.empty((batch, groups, 4), dtype=np.uint32)                                       # [B, G, 4]
    for lane, word in enumerate(_philox_full(counter, seed_key(seed), (batch, groups))):
        words[:, :, lane] = word
    return words.reshape(batch, groups * 4)[:, :units]


# The same generator for CUDA kernels (used as a preamble by kernels_cupy).
CUDA_PHILOX_SOURCE = r"""
__device__ __forceinline__ unsigned int orch_philox_word(
        unsigned int c0, unsigned int c1, unsigned int c2, unsigned int c3,
        unsigned int k0, unsigned int k1, int word) {
    #pragma unroll
    for (int round = 0; round < 10; ++round) {
        unsigned int hi0 = __umulhi(0xD2511F53u, c0);
        unsigned int lo0 = 0xD2511F53u * c0;
        unsigned int hi1 = __umulhi(0xCD9E8D57u, c2);
        unsigned int lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return word == 0 ? c0 : (word == 1 ? c1 : (word == 2 ? c2 : c3));
}

// Keep decision for element (example, unit) of one layer's activations.
__device__ __forceinline__ bool orch_dropout_keep(
        unsigned long long seed, unsigned long long step, unsigned int layer,
        unsigned long long example, unsigned int unit, unsigned int threshold) {
    unsigned int word = orch_philox_word(
        unit >> 3, (unsigned int)example, (unsigned int)step, layer,
        (unsigned int)seed, (unsigned int)(seed >> 32), (unit & 7) >> 1);
    unsigned int bits = (unit & 1) ? (word >> 16) : (word & 0xFFFFu);
    return bits < threshold;
}
"""

"""Philox4x32-10 bits and the dropout masks built on them."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.engine import rng

# Random123 known-answer vectors (tests/kat_vectors, "philox4x32 10").
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    assert tuple(int(w) for w in rng.philox4x32(counter, key)) == expected


def test_in_place_rounds_equal_the_reference_rounds():
    counter = (np.arange(5, dtype=np.uint64)[None, :], np.arange(2**32 - 2, 2**32 + 1, dtype=np.uint64)[:, None]
               & np.uint64(0xFFFFFFFF), 77, 3)
    fast = rng._philox_full(counter, (12, 34), (3, 5))
    reference = rng.philox4x32(counter, (12, 34))
    for a, b in zip(fast, reference):
        np.testing.assert_array_equal(a, np.broadcast_to(b, (3, 5)))


def test_vectorized_philox_equals_elementwise():
    counters = np.arange(12, dtype=np.uint64).reshape(3, 4) * np.uint64(0x9E3779B1) & np.uint64(0xFFFFFFFF)
    vector = rng.philox4x32(tuple(counters[:, j] for j in range(4)), (7, 11))
    for row in range(3):
        single = rng.philox4x32(tuple(int(c) for c in counters[row]), (7, 11))
        assert [int(w[row]) for w in vector] == [int(w) for w in single]


def test_bits_follow_the_documented_counter_layout():
    bits = rng.random_bits(seed=(5 << 32) | 3, step=9, layer=2, example_offset=40, batch=2, units=20)
    words = rng.philox4x32((1, 41, 9, 2), (3, 5))          # units 8..15 of example 41 -> block 1
    assert bits.dtype == np.uint16 and bits.shape == (2, 20)
    assert int(bits[1, 13]) == int(words[2]) >> 16          # unit 13: word (13 % 8) // 2 = 2, odd: high half
    assert int(bits[1, 12]) == int(words[2]) & 0xFFFF       # unit 12: same word, low half
    first = rng.philox4x32((0, 40, 9, 2), (3, 5))
    assert int(bits[0, 1]) == int(first[0]) >> 16


def test_mask_of_a_slice_is_the_slice_of_the_mask():
    full = rng.keep_mask(3, step=7, layer=1, example_offset=0, batch=32, units=50, keep_prob=0.5)
    part = rng.keep_mask(3, step=7, layer=1, example_offset=10, batch=9, units=50, keep_prob=0.5)
    np.testing.assert_array_equal(part, full[10:19])


def test_masks_differ_by_seed_step_and_layer():
    base = dict(seed=1, step=0, layer=0, example_offset=0, batch=16, units=64, keep_prob=0.5)
    reference = rng.keep_mask(**base)
    for change in ({"seed": 2}, {"step": 1}, {"layer": 1}, {"example_offset": 16}):
        assert (rng.keep_mask(**{**base, **change}) != reference).mean() > 0.3


@pytest.mark.parametrize("keep_prob", [0.5, 0.8, 0.9])
def test_keep_rate_matches_keep_prob(keep_prob):
    mask = rng.keep_mask(0, step=0, layer=0, example_offset=0, batch=400, units=500, keep_prob=keep_prob)
    assert abs(mask.mean() - keep_prob) < 0.005            # 200k Bernoulli draws: sd ~0.001


def test_bits_are_uniform_per_word_lane():
    bits = rng.random_bits(11, step=0, layer=0, example_offset=0, batch=256, units=256)
    for lane in range(8):
        lane_bits = bits[:, lane::8].astype(np.float64) / 2**16
        assert abs(lane_bits.mean() - 0.5) < 0.01
        counts, _ = np.histogram(lane_bits, bins=16, range=(0, 1))
        assert counts.min() > 0.8 * counts.mean()


def test_keep_threshold_rejects_bad_probabilities():
    assert rng.keep_threshold(1.0) == 2**16 - 1
    assert rng.keep_threshold(0.5) == 2**15
    assert rng.keep_threshold(0.8) == 52428                 # keep_prob quantized to 1/65536
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_prob"):
            rng.keep_threshold(bad)


def test_chosen_blocks_draw_the_full_draws_bits():
    full = rng.random_bits(seed=9, step=4, layer=3, example_offset=17, batch=5, units=96)
    blocks = np.array([0, 3, 4, 11])
    part = rng.random_bits(seed=9, step=4, layer=3, example_offset=17, batch=5, units=0, blocks=blocks)
    assert part.shape == (5, 32)
    np.testing.assert_array_equal(part.reshape(5, 4, 8), full.reshape(5, 12, 8)[:, blocks])

"""The ownership map: deterministic, balanced by bytes, every variable owned exactly once."""

from __future__ import annotations

import random

import pytest

from orchestrator.cluster.ownership import assign_owners

MLP_SIZES = {  # the 784-625-625-10 reference MLP, float32 bytes
    "dense/kernel": 784 * 625 * 4, "dense/bias": 625 * 4,
    "dense_1/kernel": 625 * 625 * 4, "dense_1/bias": 625 * 4,
    "dense_2/kernel": 625 * 10 * 4, "dense_2/bias": 10 * 4,
}


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4, 7])
def test_every_variable_has_exactly_one_owner(num_workers):
    ownership = assign_owners(MLP_SIZES, num_workers)
    owned = [name for rank in range(num_workers) for name in ownership.owned_by(rank)]
    assert sorted(owned) == sorted(MLP_SIZES)
    assert sum(ownership.load_bytes) == sum(MLP_SIZES.values())


def test_independent_of_input_order():
    names = list(MLP_SIZES)
    random.Random(1).shuffle(names)
    shuffled = {name: MLP_SIZES[name] for name in names}
    assert assign_owners(shuffled, 3).owner == assign_owners(MLP_SIZES, 3).owner


def test_greedy_largest_first_to_least_loaded():
    ownership = assign_owners(MLP_SIZES, 2)
    # the two big kernels go to different workers; the rest fills the lighter one
    assert ownership.owner["dense/kernel"] != ownership.owner["dense_1/kernel"]
    assert ownership.owner["dense/kernel"] == 0
    assert ownership.imbalance() < 1.12


def test_ties_broken_by_name_then_rank():
    ownership = assign_owners({"b": 8, "a": 8, "c": 8, "d": 8}, 2)
    assert ownership.owner == {"a": 0, "b": 1, "c": 0, "d": 1}


def test_balanced_for_many_equal_variables():
    sizes = {f"v{i:02d}": 1000 for i in range(12)}
    assert assign_owners(sizes, 4).load_bytes == (3000, 3000, 3000, 3000)


def test_slots_scale_loads_but_not_the_assignment():
    plain = assign_owners(MLP_SIZES, 3)
    with_slots = assign_owners(MLP_SIZES, 3, slots_per_variable=2)
    assert with_slots.owner == plain.owner
    assert with_slots.load_bytes == tuple(3 * b for b in plain.load_bytes)


def test_more_workers_than_variables_leaves_some_empty():
    ownership = assign_owners({"a": 4, "b": 4}, 4)
    assert [len(ownership.owned_by(r)) for r in range(4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("bad", [0, -1])
def test_rejects_non_positive_worker_count(bad):
    with pytest.raises(ValueError, match="num_workers"):
        assign_owners(MLP_SIZES, bad)

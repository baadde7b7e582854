"""The workers' exchange on its own (threads standing in for ranks, real TCP on 127.0.0.1):
owners get the rank-order sum, every rank gets every owner's parameters, and a peer that
closes or goes silent is named within the timeout."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from orchestrator.checkpoint.variables import Variable
from orchestrator.cluster.exchange import PeerFailedError, SocketExchange
from orchestrator.cluster.ownership import assign_owners

SHAPES = {"a/kernel": (300, 70), "a/bias": (70,), "b/kernel": (70, 3), "b/bias": (3,)}


def mesh(world: int, timeout: float = 5.0, shared_memory: bool = True) -> list[SocketExchange]:
    """``world`` connected ranks, each starting from its own (stale) values: -1 - rank."""
    exchanges = []
    for rank in range(world):
        variables = {n: Variable(n, np.full(s, -1.0 - rank, np.float32)) for n, s in SHAPES.items()}
        ownership = assign_owners({n: v.nbytes for n, v in variables.items()}, world)
        exchanges.append(SocketExchange(rank, world, variables, ownership, timeout, "127.0.0.1",
                                        shared_memory=shared_memory))
    addresses = [e.address() for e in exchanges]
    on_all(exchanges, lambda e: e.connect(addresses))
    for name in SHAPES:  # connecting brought every owner's values to every rank
        owner = next(e.rank for e in exchanges if name in e.names_of[e.rank])
        assert all((e.variables[name].value == -1.0 - owner).all() for e in exchanges)
    assert {e.mode for e in exchanges} == {"shared_memory" if shared_memory else "tcp"}
    return exchanges


def on_all(exchanges, work) -> list:
    """``work(exchange)`` on every rank at once (each rank blocks until its peers take part)."""
    results, errors = [None] * len(exchanges), []

    def run(rank):
        try:
            results[rank] = work(exchanges[rank])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(exchanges))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared_memory", "tcp"])
@pytest.mark.parametrize("world", [2, 3])
def test_owners_get_rank_order_sums_and_everyone_gets_every_parameter(world, shared_memory):
    exchanges = mesh(world, shared_memory=shared_memory)
    rng = np.random.default_rng(0)
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(world)]

    def step(e: SocketExchange):
        owned = e.names_of[e.rank]
        totals = e.reduce(0, grads[e.rank], owned)
        for name in owned:  # the owner's update, in place: its parameter becomes the summed gradient
            e.variables[name].value[...] = totals[name]
        return e.share(0, float(e.rank + 1))

    losses = on_all(exchanges, step)
    assert losses == [[float(r + 1) for r in range(world)]] * world
    for name in SHAPES:
        expected = grads[0][name]
        for rank in range(1, world):
            expected = expected + grads[rank][name]  # rank order: bit-exact
        for e in exchanges:
            assert e.variables[name].value.tobytes() == expected.tobytes(), (name, e.rank)
    for e in exchanges:
        e.close()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared_memory", "tcp"])
def test_a_silent_peer_is_named_after_the_timeout_and_a_closed_one_at_once(shared_memory):
    exchanges = mesh(2, timeout=1.0, shared_memory=shared_memory)
    grads = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    begin = time.monotonic()
    with pytest.raises(PeerFailedError) as hung:  # rank 0 never joins step 5: rank 1 waits, then names it
        exchanges[1].share(5, 0.0)
    waited = time.monotonic() - begin
    assert (hung.value.peer, hung.value.hung, hung.value.step) == (0, True, 5)
    assert 1.0 <= waited < 5
    exchanges[0].close()  # rank 0 dies: its connections close
    begin = time.monotonic()
    with pytest.raises(PeerFailedError) as died:
        exchanges[1].reduce(6, grads, exchanges[1].names_of[1])
    assert (died.value.peer, died.value.hung, died.value.step) == (0, False, 6)
    assert time.monotonic() - begin < 1.0, "a closed connection is noticed without waiting for the timeout"
    exchanges[1].close()


def test_shared_memory_leaves_nothing_in_dev_shm():
    import os

    from orchestrator.cluster.exchange import SHM_DIR

    before = set(os.listdir(SHM_DIR))
    exchanges = mesh(2)
    assert set(os.listdir(SHM_DIR)) == before, "segments are unlinked once every rank mapped them"
    for e in exchanges:
        e.close()

"""ScalingPolicy: the largest M' in [min, max] that fits, wait-then-fail below min."""

from __future__ import annotations

import pytest

from orchestrator.cluster.scaling_policy import (
    InsufficientWorkersError, NodeCapacity, ScalingKind, ScalingPolicy, WorkerShape,
    workers_that_fit)


class FakeClock:
    """Time that advances only when the policy sleeps."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _policy(lo=1, hi=4, cpus=1.0, gpus=0.0, timeout=10.0, clock=None):
    clock = clock or FakeClock()
    return ScalingPolicy(lo, hi, WorkerShape(cpus, gpus), timeout, clock=clock,
                         sleep=clock.sleep)


def test_capacity_is_counted_per_node_not_summed():
    nodes = [NodeCapacity("a", cpus=1.5), NodeCapacity("b", cpus=1.5)]
    # 3 CPUs in total, but a 2-CPU worker fits on neither node.
    assert workers_that_fit(nodes, WorkerShape(cpus=2.0), cap=8) == 0
    assert workers_that_fit(nodes, WorkerShape(cpus=0.5), cap=8) == 6


def test_gpus_and_cpus_both_limit():
    nodes = [NodeCapacity("a", cpus=8, gpus=1), NodeCapacity("b", cpus=1, gpus=4)]
    assert workers_that_fit(nodes, WorkerShape(cpus=1, gpus=1), cap=8) == 2


def test_draining_nodes_offer_no_capacity():
    nodes = [NodeCapacity("a", cpus=4), NodeCapacity("b", cpus=4, draining=True)]
    assert workers_that_fit(nodes, WorkerShape(cpus=1), cap=8) == 4


def test_zero_resources_per_worker_fits_max():
    assert workers_that_fit([NodeCapacity("a", cpus=0)], WorkerShape(0, 0), cap=3) == 3


def test_decide_picks_largest_that_fits_within_bounds():
    policy = _policy(lo=2, hi=4)
    assert policy.decide([NodeCapacity("a", cpus=8)]).num_workers == 4
    assert policy.decide([NodeCapacity("a", cpus=3)]).num_workers == 3
    waiting = policy.decide([NodeCapacity("a", cpus=1)])
    assert (waiting.kind, waiting.fits) == (ScalingKind.WAIT, 1)


def test_should_grow_counts_the_workers_already_held():
    policy = _policy(lo=1, hi=4)
    assert policy.should_grow(2, [NodeCapacity("a", cpus=0)]) is None
    assert policy.should_grow(2, [NodeCapacity("a", cpus=1)]) == 3
    assert policy.should_grow(2, [NodeCapacity("a", cpus=5)]) == 4
    assert policy.should_grow(4, [NodeCapacity("a", cpus=5)]) is None


def test_wait_for_workers_returns_once_capacity_appears():
    clock = FakeClock()
    policy = _policy(lo=2, hi=4, timeout=10.0, clock=clock)
    probes = iter([[NodeCapacity("a", cpus=1)]] * 3 + [[NodeCapacity("a", cpus=2)]])
    assert policy.wait_for_workers(lambda: next(probes), poll_s=1.0) == 2
    assert clock.sleeps == [1.0, 1.0, 1.0]


def test_wait_for_workers_fails_after_timeout_with_clear_message():
    clock = FakeClock()
    policy = _policy(lo=3, hi=4, cpus=2.0, timeout=5.0, clock=clock)
    with pytest.raises(InsufficientWorkersError) as info:
        policy.wait_for_workers(lambda: [NodeCapacity("a", cpus=4)], poll_s=1.0)
    message = str(info.value)
    assert "only 2 worker(s)" in message and "workers.min=3" in message
    assert "min_workers_timeout_s=5" in message
    assert clock.now == pytest.approx(5.0)


def test_invalid_bounds_rejected():
    with pytest.raises(ValueError, match="workers.min"):
        _policy(lo=3, hi=2)


def test_probe_ray_capacity_sees_the_session_cluster(ray_session):
    from orchestrator.cluster.scaling_policy import probe_ray_capacity

    nodes = probe_ray_capacity()
    assert len(nodes) == 1 and not nodes[0].draining
    assert 0 < nodes[0].cpus <= 8


def test_wait_for_workers_stops_when_cancelled():
    clock = FakeClock()
    policy = _policy(lo=2, hi=2, timeout=100.0, clock=clock)
    assert policy.wait_for_workers(lambda: [], poll_s=1.0,
                                   cancelled=lambda: clock.now >= 3.0) == 0
    assert clock.now == pytest.approx(3.0)


def test_waiting_for_capacity_is_logged_on_change_and_every_interval_not_every_poll(caplog):
    """A 300 s wait polled every 0.5 s logs a handful of lines, not 600."""
    from orchestrator.cluster.scaling_policy import WAIT_LOG_INTERVAL_S

    clock = FakeClock()
    policy = _policy(lo=3, hi=3, timeout=400.0, clock=clock)

    def probe():  # one worker fits for the first 100 s, then two, then (at 300 s) three
        return [NodeCapacity("a", cpus=1 + (clock.now >= 100) + (clock.now >= 300))]

    with caplog.at_level("INFO", logger="orchestrator.cluster.scaling_policy"):
        assert policy.wait_for_workers(probe, poll_s=0.5) == 3
    waits = [r.getMessage() for r in caplog.records if "waiting for capacity" in r.getMessage()]
    assert len(clock.sleeps) == 600
    assert WAIT_LOG_INTERVAL_S == 30.0
    said_at = [int(w.split("(")[-1].split(" s of")[0]) for w in waits]
    assert said_at == [0, 30, 60, 90, 100, 130, 160, 190, 220, 250, 280]  # on change (100 s), else every 30 s
    assert waits[0].startswith("scaling: waiting for capacity: 1 worker(s) fit")
    assert waits[4].startswith("scaling: waiting for capacity: 2 worker(s) fit")

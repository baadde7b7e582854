"""FailurePolicy: restart with backoff until max_failures, then raise."""

from __future__ import annotations

import logging

import pytest

from orchestrator.cluster.failure_policy import (
    BackoffKind, Decision, DecisionKind, Failure, FailurePolicy)


def _decide_all(policy: FailurePolicy, failures: list[Failure]) -> list[Decision]:
    return [policy.make_decision(f, failures[:i]) for i, f in enumerate(failures)]


def test_restarts_until_max_failures_then_raises():
    policy = FailurePolicy(max_failures=2, backoff_s=0.5, backoff="fixed")
    decisions = _decide_all(policy, [Failure("killed")] * 3)
    assert [d.kind for d in decisions] == [DecisionKind.RESTART, DecisionKind.RESTART,
                                           DecisionKind.RAISE]
    assert [d.backoff_s for d in decisions[:2]] == [0.5, 0.5]
    assert "max_failures=2" in decisions[2].reason


def test_zero_max_failures_raises_on_first_failure():
    decision = FailurePolicy(max_failures=0).make_decision(Failure("boom"), [])
    assert decision.kind is DecisionKind.RAISE


def test_unlimited_never_raises():
    policy = FailurePolicy(max_failures=-1, backoff_s=0.0)
    history = [Failure(f"fault {i}") for i in range(500)]
    decision = policy.make_decision(Failure("again"), history)
    assert decision.kind is DecisionKind.RESTART
    assert "unlimited" in decision.reason


def test_exponential_backoff_grows_while_no_progress_and_resets_after_progress():
    policy = FailurePolicy(max_failures=-1, backoff_s=1.0, backoff=BackoffKind.EXPONENTIAL,
                           max_backoff_s=5.0)
    failures = [Failure("a", made_progress=True), Failure("b", made_progress=False),
                Failure("c", made_progress=False), Failure("d", made_progress=False),
                Failure("e", made_progress=False), Failure("f", made_progress=True)]
    backoffs = [d.backoff_s for d in _decide_all(policy, failures)]
    assert backoffs == [1.0, 2.0, 4.0, 5.0, 5.0, 1.0]


def test_each_decision_is_logged_with_its_cause(caplog):
    policy = FailurePolicy(max_failures=1, backoff_s=0.0)
    with caplog.at_level(logging.WARNING, logger="orchestrator.cluster.failure_policy"):
        policy.make_decision(Failure("worker rank 1 died: SIGKILL", rank=1, step=7), [])
        policy.make_decision(Failure("step timeout", rank=0, step=9), [Failure("x")])
    messages = [r.getMessage() for r in caplog.records]
    assert "SIGKILL" in messages[0] and "restart" in messages[0] and "step 7" in messages[0]
    assert "step timeout" in messages[1] and "raise" in messages[1]
    assert caplog.records[1].levelno == logging.ERROR


@pytest.mark.parametrize("kwargs, field", [({"max_failures": -2}, "max_failures"),
                                           ({"backoff_s": -1.0}, "backoff_s")])
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FailurePolicy(**kwargs)


def test_from_config_reads_fault_tolerance_group():
    class FT:
        max_failures = 4
        backoff_s = 0.25

    policy = FailurePolicy.from_config(FT(), backoff="fixed")
    assert (policy.max_failures, policy.backoff_s, policy.backoff) == (4, 0.25,
                                                                       BackoffKind.FIXED)

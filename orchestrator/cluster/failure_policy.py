"""Failure policy: decides whether a failed job restarts (after a backoff) or gives up.

The policy only decides; the Supervisor acts on the decision. Keeping the two apart
lets tests drive every branch with plain ``Failure`` values and no Ray.

``max_failures`` counts failures over the whole job (-1 = unlimited). The backoff
grows exponentially with the number of *consecutive* failures that made no progress
(no completed step since the previous restart), so a job that keeps training between
rare faults restarts quickly while a crash loop slows down.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from typing import Sequence

from orchestrator import rules

logger = logging.getLogger(__name__)

UNLIMITED = rules.UNLIMITED


class DecisionKind(str, enum.Enum):
    RESTART = "restart"
    RAISE = "raise"


class BackoffKind(str, enum.Enum):
    FIXED = "fixed"
    EXPONENTIAL = "exponential"


@dataclasses.dataclass(frozen=True)
class Failure:
    """One observed failure of a job attempt.

    ``made_progress`` says whether the attempt that failed completed at least one
    step after it (re)started; it resets the exponential backoff.
    """

    cause: str
    rank: int | None = None
    step: int | None = None
    made_progress: bool = True
    time: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    backoff_s: float
    reason: str


class FailurePolicy:
    """Turns ``(failure, history)`` into RESTART-after-backoff or RAISE."""

    def __init__(self, max_failures: int = 3, backoff_s: float = 1.0,
                 backoff: BackoffKind | str = BackoffKind.EXPONENTIAL,
                 max_backoff_s: float = 60.0):
        rules.MAX_FAILURES.check("max_failures", max_failures)
        rules.BACKOFF_S.check("backoff_s", backoff_s)
        self.max_failures = max_failures
        self.backoff_s = float(backoff_s)
        self.backoff = BackoffKind(backoff)
        self.max_backoff_s = float(max_backoff_s)

    @classmethod
    def from_config(cls, fault_tolerance, **overrides) -> "FailurePolicy":
        """Builds the policy from a ``FaultToleranceConfig``."""
        return cls(max_failures=fault_tolerance.max_failures,
                   backoff_s=fault_tolerance.backoff_s, **overrides)

    def make_decision(self, failure: Failure, history: Sequence[Failure]) -> Decision:
        """Decides for ``failure``; ``history`` holds the earlier failures, oldest first."""
        count = len(history) + 1
        decision = self._decide(failure, history, count)
        log = logger.error if decision.kind is DecisionKind.RAISE else logger.warning
        log("failure %d (rank %s, step %s): %s -> %s (%s)", count, failure.rank,
            failure.step, failure.cause, decision.kind.value, decision.reason)
        return decision

    def _decide(self, failure: Failure, history: Sequence[Failure], count: int) -> Decision:
        if self.max_failures != UNLIMITED and count > self.max_failures:
            return Decision(DecisionKind.RAISE, 0.0,
                            f"{count} failures exceed fault_tolerance.max_failures="
                            f"{self.max_failures}")
        backoff = self._backoff(_consecutive_without_progress(failure, history))
        limit = "unlimited" if self.max_failures == UNLIMITED else str(self.max_failures)
        return Decision(DecisionKind.RESTART, backoff,
                        f"failure {count} of max_failures={limit}; backoff {backoff:.2f}s "
                        f"({self.backoff.value})")

    def _backoff(self, consecutive: int) -> float:
        if self.backoff is BackoffKind.FIXED:
            return self.backoff_s
        return min(self.backoff_s * 2 ** (consecutive - 1), self.max_backoff_s)


def _consecutive_without_progress(failure: Failure, history: Sequence[Failure]) -> int:
    """1 + the number of directly preceding failures whose attempt made no progress."""
    consecutive = 1
    if failure.made_progress:
        return consecutive
    for earlier in reversed(history):
        consecutive += 1
        if earlier.made_progress:
            break
    return consecutive

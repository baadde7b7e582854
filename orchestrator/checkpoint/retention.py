"""Retention policies: which checkpoints to keep, and why.

Policies only decide; ``CheckpointManager`` and ``Saver`` act on the decisions
(write the state file first, then delete). Time is always passed in as ``now``
so tests drive it with an injected clock.

Two schemes, matching TensorFlow:

* ``ManagerRetention`` -- ``tf.train.CheckpointManager`` (reference 7.4): keep the
  ``max_to_keep`` newest; a checkpoint falling out of that window is preserved
  forever if it is at least N hours after the last preserved one, else deleted.
  Beyond TF: ``BestK`` keeps the k best by a reported metric.
* ``SaverRetention`` -- TF1 ``tf.train.Saver`` (reference 7.3): a FIFO of expired
  checkpoints, at most one deletion per save, with ``next_checkpoint_time``.

Clock going backwards: a checkpoint whose timestamp (or the last preserved
timestamp) lies in the future of ``now`` is *in doubt* and is kept, never
deleted, until the clock has caught up.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from orchestrator import rules

SECONDS_PER_HOUR = 3600.0


class Action(str, enum.Enum):
    KEEP = "keep"  # stays tracked in the state file
    PRESERVE = "preserve"  # kept forever, no longer tracked (TF every-N-hours)
    DELETE = "delete"


@dataclass(frozen=True)
class Tracked:
    """A checkpoint the retention scheme still tracks (oldest first in lists)."""

    path: str
    timestamp: float
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    path: str
    action: Action
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class LatestN:
    """Keep the ``n`` newest; ``n`` None or 0 keeps everything (TF)."""

    n: int | None

    def __post_init__(self):
        if self.n is not None:
            rules.MAX_TO_KEEP.check("max_to_keep", self.n)

    @property
    def keeps_all(self) -> bool:
        return not self.n

    @property
    def reason(self) -> str:
        return "all" if self.keeps_all else f"latest-{self.n}"

    def keep(self, tracked: Sequence[Tracked]) -> set[str]:
        if self.keeps_all:
            return {t.path for t in tracked}
        return {t.path for t in tracked[-self.n :]}


@dataclass(frozen=True)
class EveryNHours:
    """Preserve one checkpoint per ``hours``: TF's ``ts - N*3600 >= last_preserved``."""

    hours: float

    reason = "every-n-hours"

    def __post_init__(self):
        rules.KEEP_EVERY_N_HOURS.check("keep_checkpoint_every_n_hours", self.hours)

    def should_preserve(self, timestamp: float, last_preserved: float) -> bool:
        return timestamp - self.hours * SECONDS_PER_HOUR >= last_preserved


@dataclass(frozen=True)
class BestK:
    """Keep the ``k`` checkpoints with the best value of ``metric``.

    Checkpoints that did not report the metric (or reported NaN) never count as best.
    Ties go to the newer checkpoint.
    """

    metric: str
    k: int
    mode: str = "min"

    def __post_init__(self):
        rules.check_best_mode(self.mode)
        rules.KEEP_BEST.check("keep_best", self.k)

    @property
    def reason(self) -> str:
        return f"best({self.metric})"

    def keep(self, tracked: Sequence[Tracked]) -> set[str]:
        scored = [(self._score(t), i, t.path) for i, t in enumerate(tracked) if self._has(t)]
        scored.sort(key=lambda s: (s[0], -s[1]))
        return {path for _, _, path in scored[: self.k]}

    def _has(self, t: Tracked) -> bool:
        value = t.metrics.get(self.metric)
        return value is not None and not math.isnan(float(value))

    def _score(self, t: Tracked) -> float:
        value = float(t.metrics[self.metric])
        return value if self.mode == "min" else -value


@dataclass(frozen=True)
class SweepResult:
    decisions: tuple[Decision, ...]
    last_preserved: float

    def paths(self, action: Action) -> list[str]:
        return [d.path for d in self.decisions if d.action is action]


@dataclass(frozen=True)
class ManagerRetention:
    """TF ``CheckpointManager`` retention plus keep-best-k."""

    latest: LatestN
    every_n_hours: EveryNHours | None = None
    best: BestK | None = None

    def sweep(self, tracked: Sequence[Tracked], last_preserved: float, now: float) -> SweepResult:
        """Decide, oldest first, for every tracked checkpoint."""
        keep_latest = self.latest.keep(tracked)
        keep_best = self.best.keep(tracked) if self.best else set()
        decisions = []
        for t in tracked:
            reasons = self._keep_reasons(t.path, keep_latest, keep_best)
            if reasons:
                decisions.append(Decision(t.path, Action.KEEP, reasons))
            elif _in_doubt(t.timestamp, last_preserved, now):
                decisions.append(Decision(t.path, Action.KEEP, ("clock-went-backwards",)))
            elif self.every_n_hours and self.every_n_hours.should_preserve(t.timestamp, last_preserved):
                last_preserved = t.timestamp
                decisions.append(Decision(t.path, Action.PRESERVE, (self.every_n_hours.reason,)))
            else:
                decisions.append(Decision(t.path, Action.DELETE, ("expired",)))
        return SweepResult(tuple(decisions), last_preserved)

    def _keep_reasons(self, path: str, keep_latest: set[str], keep_best: set[str]) -> tuple[str, ...]:
        reasons = []
        if path in keep_latest:
            reasons.append(self.latest.reason)
        if path in keep_best:
            reasons.append(self.best.reason)
        return tuple(reasons)


def _in_doubt(timestamp: float, last_preserved: float, now: float) -> bool:
    return timestamp > now or last_preserved > now


@dataclass
class SaverRetention:
    """TF1 ``Saver`` retention state: ``_last_checkpoints`` and the deletion FIFO.

    ``record`` is called after each save; ``next_deletion`` is then called once and
    yields at most one decision (TF deletes at most one checkpoint per save).
    """

    max_to_keep: int
    keep_every_n_hours: float
    next_checkpoint_time: float
    last_checkpoints: list[Tracked] = field(default_factory=list)
    to_be_deleted: list[Tracked] = field(default_factory=list)

    @classmethod
    def starting_at(cls, now: float, max_to_keep: int | None, hours: float) -> "SaverRetention":
        return cls(int(max_to_keep or 0), float(hours), now + hours * SECONDS_PER_HOUR)

    def record(self, path: str, now: float) -> None:
        if self.max_to_keep <= 0:
            return
        self.last_checkpoints = [t for t in self.last_checkpoints if t.path != path]
        self.last_checkpoints.append(Tracked(path, now))
        if len(self.last_checkpoints) > self.max_to_keep:
            self.to_be_deleted.append(self.last_checkpoints.pop(0))

    def state_paths(self, latest: str) -> list[str]:
        """``all_model_checkpoint_paths`` for the state file; always ends with ``latest``."""
        paths = [t.path for t in self.last_checkpoints]
        if not paths or paths[-1] != latest:
            paths.append(latest)
        return paths

    def next_deletion(self, now: float) -> Decision | None:
        if not self.to_be_deleted:
            return None
        oldest = self.to_be_deleted.pop(0)
        if _in_doubt(oldest.timestamp, self.next_checkpoint_time - self._period, now):
            return Decision(oldest.path, Action.PRESERVE, ("clock-went-backwards",))
        if oldest.timestamp > self.next_checkpoint_time:
            self.next_checkpoint_time += self._period
            return Decision(oldest.path, Action.PRESERVE, ("every-n-hours",))
        return Decision(oldest.path, Action.DELETE, ("expired",))

    @property
    def _period(self) -> float:
        return self.keep_every_n_hours * SECONDS_PER_HOUR

"""Supervisor: the restart loop around the Coordinator.

One job = a sequence of *attempts*. Each attempt sizes the job with the scaling
policy, creates a Coordinator with M workers, restores from the latest committed
checkpoint and trains. An attempt ends in one of four ways:

* done: train.steps reached -> the JobResult is returned.
* preempted: the PreemptionWatcher fired (SIGTERM/SIGINT, notice file, Ray drain);
  the coordinator wrote and committed a checkpoint of the current step -> returned
  with ``preempted=True`` (the CLI exits with code 3; the same command resumes).
* resize: at a checkpoint boundary more workers fit again -> the coordinator
  checkpoints the current step, and the next attempt restarts with the larger M'.
* failed: a worker died, raised or hung (WorkerFailedError) -> the failure policy
  decides RESTART (after a backoff) or RAISE. A restart first *heals* the running
  attempt (``Coordinator.heal``: only the lost workers are replaced, every worker goes
  back to the latest complete memory checkpoint, or to storage); only when that fails
  does a new attempt start from the latest committed checkpoint in storage.

Each recovery is timed phase by phase (``monitor.recovery.RecoveryRecord``: detect,
replace, restore, first step; steps lost; the tier restored from) from the failed
coordinator's last completed step to the first step the next attempt completes
(``reporter.on_step``), and reported through ``reporter.on_recovery``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
import warnings
from typing import Any, Callable, Sequence

from orchestrator.checkpoint import commit as commit_lib
from orchestrator.cluster import recipe
from orchestrator.cluster.errors import ClusterError, WorkerFailedError
from orchestrator.cluster.failure_policy import DecisionKind, Failure, FailurePolicy
from orchestrator.cluster.preemption import PreemptionWatcher
from orchestrator.cluster.scaling_policy import (
    NodeCapacity, ScalingPolicy, probe_ray_capacity, probe_ray_totals)
from orchestrator.monitor.recovery import RecoveryRecord

logger = logging.getLogger(__name__)

HEAL_START_S = 60.0  # a replacement actor that has room but is not up by then: the job restarts


class Outcome(str, enum.Enum):
    DONE = "done"
    PREEMPTED = "preempted"
    RESIZE = "resize"
    FAILED = "failed"


@dataclasses.dataclass
class AttemptResult:
    """How one coordinator attempt ended."""

    outcome: Outcome
    num_workers: int
    result: Any = None  # the coordinator's result (DONE / PREEMPTED / RESIZE)
    failure: Failure | None = None
    resize_to: int | None = None


@dataclasses.dataclass
class _Recovering:
    """A recovery under way: the failure's facts, then the times of each phase's end."""

    record: RecoveryRecord
    last_progress: float     # the failed attempt's last completed step
    failed_at: float         # when the failure surfaced
    replaced_at: float | None = None
    restored_at: float | None = None

    def finish(self, now: float) -> RecoveryRecord:
        record = self.record
        record.detect_s = max(0.0, self.failed_at - self.last_progress)
        record.replace_s = max(0.0, self.replaced_at - self.failed_at)
        record.restore_s = max(0.0, self.restored_at - self.replaced_at)
        record.first_step_s = max(0.0, now - self.restored_at)
        return record


class _AttemptTracker:
    """Reporter proxy: forwards every event and watches steps and checkpoints.

    It is how the Supervisor learns, without coordinator hooks, that a checkpoint
    boundary passed (``on_checkpoint``) and when the first step after a recovery
    completed (the first ``on_step``: the coordinator always reports the first step of
    an attempt).
    """

    def __init__(self, inner, clock: Callable[[], float], on_commit: Callable[[int], None] | None = None):
        self._inner = inner
        self._clock = clock
        self._on_commit = on_commit
        self.checkpoint_boundary = False
        self.committed_steps: list[int] = []
        self.recovering: _Recovering | None = None
        self.recoveries: list[RecoveryRecord] = []

    def new_attempt(self) -> None:
        self.checkpoint_boundary = False

    def failed(self, error: WorkerFailedError, coord) -> None:
        """A coordinator attempt failed: start timing the recovery (a failure while recovering
        from an earlier one extends that recovery)."""
        if self.recovering is not None:
            self.recovering.replaced_at = self.recovering.restored_at = None
            return
        record = RecoveryRecord(kind=error.kind, tier="storage", failed_step=coord.global_step,
                                restored_step=coord.global_step, rank=error.rank)
        self.recovering = _Recovering(record, coord.last_progress, self._clock())

    def restarted(self, coord) -> None:
        """The next attempt's coordinator is ready: workers up, state restored."""
        if self.recovering is not None:
            self.recovering.replaced_at = coord.workers_ready_at
            self.recovering.restored_at = coord.ready_at
            self.recovering.record.restored_step = coord.global_step
            self.recovering.record.workers_replaced = coord.workers_replaced or len(coord.workers)
            self.recovering.record.tier = coord.restore_tier or "none"

    def on_step(self, step, metrics=None, *args, **kwargs):
        recovering = self.recovering
        if recovering is not None and recovering.restored_at is not None:
            self.recovering = None
            record = recovering.finish(self._clock())
            self.recoveries.append(record)
            logger.warning("recovered: step %s completed; %s", step, record.describe())
            self._forward("on_recovery", record)
        return self._forward("on_step", step, metrics, *args, **kwargs)

    def on_checkpoint(self, step, *args, **kwargs):
        self.committed_steps.append(step)
        self.checkpoint_boundary = True
        if self._on_commit is not None:
            self._on_commit(step)
        return self._forward("on_checkpoint", step, *args, **kwargs)

    def on_failure(self, cause, kind="worker_error"):
        return self._forward("on_failure", cause, kind)

    def on_recovery(self, record):  # the Supervisor measures recovery itself
        return None

    def _forward(self, name: str, *args, **kwargs):
        method = getattr(self._inner, name, None) if self._inner is not None else None
        return method(*args, **kwargs) if method is not None else None

    def __getattr__(self, name: str):
        """Other hooks (``on_eval``, ...) go to the inner reporter, or nowhere."""
        if name.startswith("on_"):
            return lambda *args, **kwargs: self._forward(name, *args, **kwargs)
        if self._inner is None:
            raise AttributeError(name)
        return getattr(self._inner, name)


def _default_coordinator_factory(config, num_workers, reporter, resume, dataset=None):
    from orchestrator.cluster.coordinator import Coordinator

    return Coordinator(config, num_workers=num_workers, reporter=reporter, resume=resume, dataset=dataset)


class Supervisor:
    """Runs a job to completion through worker failures, node loss and preemption.

    Policies and the coordinator factory are constructor arguments, so tests and the
    chaos script can inject their own.
    """

    def __init__(self, config, reporter=None, *,
                 failure_policy: FailurePolicy | None = None,
                 scaling_policy: ScalingPolicy | None = None,
                 watcher: PreemptionWatcher | None = None,
                 probe: Callable[[], Sequence[NodeCapacity]] = probe_ray_capacity,
                 totals: Callable[[], Sequence[NodeCapacity]] = probe_ray_totals,
                 coordinator_factory=_default_coordinator_factory,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 settle_s: float = 3.0, dataset=None):
        """``dataset``: the job's data, loaded once for every attempt (None: each attempt loads it)."""
        ft = config.fault_tolerance
        self.config = config
        self.failure_policy = failure_policy or FailurePolicy.from_config(ft)
        self.scaling_policy = scaling_policy or ScalingPolicy.from_config(config)
        self._coordinator = None
        self.watcher = watcher or PreemptionWatcher.from_config(ft, worker_node_ids=self._worker_node_ids)
        self._probe = probe
        self._totals = totals
        self._factory = coordinator_factory
        self._clock = clock
        self._sleep = sleep
        self.settle_s = settle_s
        self.tracker = _AttemptTracker(reporter, clock, on_commit=self._on_commit)
        self.failures: list[Failure] = []
        self.attempts: list[AttemptResult] = []
        self._initial_resume = config.resume  # resolved (auto -> a verified checkpoint or never) in run()
        self._resize_to: int | None = None  # set when capacity for a bigger job comes back mid-attempt
        self._dataset = dataset

    @property
    def coordinator(self):
        """The coordinator of the running attempt, or None between attempts."""
        return self._coordinator

    @property
    def recovery_seconds(self) -> list[float]:
        """Fault-to-first-step durations of every recovery so far."""
        return [r.total_s for r in self.tracker.recoveries]

    @property
    def recoveries(self) -> list[RecoveryRecord]:
        """Every recovery so far, timed phase by phase."""
        return list(self.tracker.recoveries)

    def run(self):
        """Trains to ``train.steps`` or preemption; returns the coordinator's JobResult
        with ``failures_recovered`` and ``preempted`` filled in."""
        with self.watcher:
            self._initial_resume = resolve_resume(self.config, self.config.resume)
            resume = self._initial_resume
            num_workers = self._size_job(previous=None)
            while num_workers and not self.watcher.requested():
                attempt = self._attempt(num_workers, resume)
                self.attempts.append(attempt)
                if attempt.outcome in (Outcome.DONE, Outcome.PREEMPTED):
                    return self._finish(attempt)
                resume = self._resume_after_first_attempt()
                if attempt.outcome is Outcome.RESIZE:
                    num_workers = attempt.resize_to
                    continue
                num_workers = self._size_job(previous=attempt.num_workers)
            return self._finish_preempted_between_attempts()

    # -- one attempt -------------------------------------------------------------

    def _attempt(self, num_workers: int, resume: str) -> AttemptResult:
        logger.info("starting attempt %d with %d worker(s), resume=%s",
                    len(self.attempts) + 1, num_workers, resume)
        self.tracker.new_attempt()
        self._resize_to = None
        extra = {} if self._dataset is None else {"dataset": self._dataset}
        coord = self._factory(self.config, num_workers, self.tracker, resume, **extra)
        self._coordinator = coord
        first_step = None
        try:
            coord.start()
            self.tracker.restarted(coord)
            first_step = coord.global_step
            while True:
                try:
                    result = coord.run(stop_requested=self._stop_requested, deadline=self.watcher.deadline)
                    break
                except WorkerFailedError as error:
                    failure = self._failure(error, coord.global_step > first_step)
                    self.tracker.failed(error, coord)
                    self._handle_failure(failure)
                    if not self._heal(coord, error):
                        return AttemptResult(Outcome.FAILED, num_workers, failure=failure)
                    first_step = coord.global_step
        except WorkerFailedError as error:  # while starting
            progress = first_step is not None and coord.global_step > first_step
            self.tracker.failed(error, coord)
            failure = self._failure(error, progress)
            self._handle_failure(failure)
            return AttemptResult(Outcome.FAILED, num_workers, failure=failure)
        finally:
            self._coordinator = None
            coord.shutdown()
        return self._classify(result, num_workers)

    def _heal(self, coord, error: WorkerFailedError) -> bool:
        """Replace only the lost workers of the running attempt (``Coordinator.heal``); False when
        the job must restart instead (preempted meanwhile, no capacity, another failure)."""
        heal = getattr(coord, "heal", None)  # an injected coordinator may only know how to start over
        if heal is None or self.watcher.requested():
            return False
        try:
            heal(error, start_timeout=HEAL_START_S, room_for=self._room_for)
        except ClusterError as exc:
            logger.warning("replacing the lost worker(s) in place failed (%s); restarting every worker", exc)
            return False
        self.tracker.restarted(coord)
        return True

    def _room_for(self, replacements: int) -> bool:
        """Whether the cluster could hold every worker of the running attempt at all (alive, not
        draining nodes); asked when ``replacements`` new workers are slow to start."""
        current = self._current_workers()
        return self.scaling_policy.decide(self._totals()).num_workers >= current

    def _classify(self, result, num_workers: int) -> AttemptResult:
        if not getattr(result, "preempted", False):
            return AttemptResult(Outcome.DONE, num_workers, result)
        if self.watcher.requested():
            return AttemptResult(Outcome.PREEMPTED, num_workers, result)
        return AttemptResult(Outcome.RESIZE, num_workers, result, resize_to=self._resize_to)

    def _stop_requested(self) -> bool:
        """Polled by the coordinator between steps: preemption, or room to grow."""
        if self.watcher.requested():
            return not self._evacuated()
        if not self.tracker.checkpoint_boundary:
            return False
        self.tracker.checkpoint_boundary = False
        current = self._current_workers()
        grow_to = self.scaling_policy.should_grow(current, self._probe())
        if grow_to is not None:
            logger.warning("capacity for %d worker(s) is back (running %d): checkpointing "
                           "and restarting larger", grow_to, current)
            self._resize_to = grow_to
            return True
        return False

    def _evacuated(self) -> bool:
        """A Ray drain of some of the workers' nodes, too close for a storage save: the coordinator
        moves those workers elsewhere from memory (``Coordinator.evacuate``) and the job goes on."""
        notice, coord = self.watcher.notice, self._coordinator
        if notice is None or not notice.node_ids or coord is None or not hasattr(coord, "evacuate"):
            return False
        drained = WorkerFailedError(-1, notice.reason, coord.global_step, "node_drained")
        self.tracker.failed(drained, coord)
        moved = coord.evacuate(notice.node_ids, self.watcher.deadline(), HEAL_START_S, self._room_for)
        if not moved:
            self.tracker.recovering = None
            return False
        self.tracker.restarted(coord)
        self.watcher.dismiss()
        return True

    def _on_commit(self, step: int) -> None:
        """After a preemption request, the commit of the current step is the emergency checkpoint:
        from then on a second Ctrl-C has nothing left to abort (the job only shuts down)."""
        coord = self._coordinator
        if self.watcher.reason is not None and coord is not None and step == coord.global_step:
            self.watcher.settle()

    def _current_workers(self) -> int:
        coord = self._coordinator
        return len(coord.workers) if coord is not None else 0

    def _worker_node_ids(self) -> list[str]:
        """Nodes hosting the running attempt's workers (a drain of one preempts)."""
        coord = self._coordinator
        return list(coord.worker_node_ids) if coord is not None else []

    # -- failures ----------------------------------------------------------------

    def _failure(self, error: WorkerFailedError, made_progress: bool) -> Failure:
        failure = Failure(cause=error.cause, rank=error.rank, step=error.step,
                          made_progress=made_progress)
        logger.error("worker rank %s failed at step %s (%s): %s", error.rank, error.step,
                     error.kind, error.cause)
        self.tracker.on_failure(str(error), error.kind)
        return failure

    def _handle_failure(self, failure: Failure) -> None:
        decision = self.failure_policy.make_decision(failure, self.failures)
        self.failures.append(failure)
        if decision.kind is DecisionKind.RAISE:
            raise JobFailedError(failure.rank, failure.cause, failure.step, decision.reason)
        self._sleep_unless_preempted(decision.backoff_s)

    def _sleep_unless_preempted(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while not self.watcher.requested() and self._clock() < deadline:
            self._sleep(min(0.1, max(0.0, deadline - self._clock())))

    def _size_job(self, previous: int | None) -> int:
        """M for the next attempt; 0 when preempted while waiting for capacity.

        After a failure the killed actors' resources take a moment to show as free
        again, so up to ``settle_s`` is spent waiting for the previous M to fit before
        settling for fewer workers.
        """
        if previous is not None:
            self._await_settled(previous)
        return self.scaling_policy.wait_for_workers(self._probe,
                                                    cancelled=self.watcher.requested)

    def _await_settled(self, previous: int) -> None:
        deadline = self._clock() + self.settle_s
        while self._clock() < deadline and not self.watcher.requested():
            if self.scaling_policy.decide(self._probe()).num_workers >= previous:
                return
            self._sleep(0.1)

    def _resume_after_first_attempt(self) -> str:
        """Restarts resume from the latest checkpoint this job committed (``auto``: the
        coordinator's latest; this driver just wrote it, so it is not re-verified).
        Before this job has committed any, they resume the way the first attempt did."""
        return "auto" if self.tracker.committed_steps else self._initial_resume

    # -- results -----------------------------------------------------------------

    def _finish(self, attempt: AttemptResult):
        preempted = attempt.outcome is Outcome.PREEMPTED
        if preempted:
            self._log_preemption_time()
        return _with_fields(attempt.result, preempted=preempted,
                            failures_recovered=self._recovered_count())

    def _recovered_count(self) -> int:
        """Failures the job came back from (the last one not, if no attempt followed)."""
        last_failed = bool(self.attempts) and self.attempts[-1].outcome is Outcome.FAILED
        return len(self.failures) - int(last_failed)

    def _finish_preempted_between_attempts(self):
        """Preempted while no coordinator ran (during a backoff): nothing new to save,
        the latest committed checkpoint is the resume point."""
        from orchestrator.cluster.coordinator import JobResult

        logger.warning("preempted (%s) between attempts: the latest committed checkpoint "
                       "is the resume point", self.watcher.reason)
        manager = recipe.checkpoint_manager(self.config)
        latest = manager.latest_checkpoint
        step = commit_lib.step_of(latest) if latest else None
        return JobResult(steps_completed=step or 0, final_metrics={},
                         checkpoints=list(manager.checkpoints),
                         failures_recovered=self._recovered_count(), preempted=True,
                         last_checkpoint=latest)

    def _log_preemption_time(self) -> None:
        at, deadline, now = self.watcher.requested_at, self.watcher.deadline(), time.monotonic()
        seconds = 0.0 if at is None else now - at
        left = None if deadline is None else deadline - now
        log = logger.warning if left is None or left >= 0 else logger.error
        log("preempted (%s): emergency checkpoint done %.2f s after the notice, %s", self.watcher.reason,
            seconds, "no deadline" if left is None else f"{left:.2f} s before its deadline" if left >= 0
            else f"{-left:.2f} s AFTER its deadline")


def resolve_resume(config, resume: str) -> str:
    """``auto`` -> the newest kept checkpoint that verifies (every shard present, every
    CRC right), or ``never`` when there is none. A checkpoint that fails verification is
    skipped with a warning and renamed aside for inspection; if checkpoints exist but none
    verifies, ``CorruptCheckpointError`` stops the job (exit 2) instead of silently starting
    over. Other values pass through.

    Called once when the job starts (a fresh driver, e.g. after a crash or preemption),
    where the checkpoints on disk are of unknown health; it reads every tensor once.

    Constructing the manager also removes uncommitted leftovers of interrupted saves
    (e.g. from a driver killed mid-save); no save is in flight between attempts.
    """
    if resume != "auto":
        return resume
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefix = recipe.checkpoint_manager(config).restore_or_initialize(None)
    for warning in caught:
        logger.warning("resume: %s", warning.message)
    return prefix if prefix is not None else "never"


class JobFailedError(ClusterError):
    """The failure policy gave up: too many failures (``fault_tolerance.max_failures``)."""

    def __init__(self, rank: int | None, cause: str, step: int | None, reason: str):
        super().__init__(f"job failed: worker rank {rank} at step {step}: {cause}; "
                         f"giving up: {reason}")
        self.rank, self.cause, self.step, self.reason = rank, cause, step, reason

    def __reduce__(self):
        return (type(self), (self.rank, self.cause, self.step, self.reason))


def _with_fields(result, **fields):
    """Copies the coordinator's result with ``fields`` set (dataclass or object)."""
    if dataclasses.is_dataclass(result):
        known = {f.name for f in dataclasses.fields(result)}
        return dataclasses.replace(result, **{k: v for k, v in fields.items() if k in known})
    for name, value in fields.items():
        setattr(result, name, value)
    return result

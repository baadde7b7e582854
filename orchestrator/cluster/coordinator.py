"""The coordinator: starts and watches the workers, drives steps, and owns the checkpoint directory.

It is a steppable state machine so the fault-tolerance supervisor can wrap it:

    coord = Coordinator(config, num_workers=M, reporter=r, resume="auto")
    coord.start()                        # CREATED -> READY: M actors, restore if asked
    result = coord.run(stop_requested, deadline)  # READY -> FINISHED | PREEMPTED (or raises WorkerFailedError)
    coord.shutdown()                     # -> SHUT_DOWN, idempotent

The workers run the step loop themselves and exchange gradients and parameters directly
(``exchange``); the coordinator starts chunks of steps (``train_chunk``), each ending at
the next step where something is due (a save or an evaluation by step count, the end of
training) or after about ``CHUNK_SECONDS`` (so time-based saves and preemption notices are
acted on promptly). ``step_once()`` is a chunk of one step. Between chunks policies decide
(``SavePolicy``, ``EvalPolicy``) and the coordinator acts. Only the coordinator commits a checkpoint: it starts each worker's
shard write, collects every ``ShardResult`` and calls ``CheckpointManager.commit``
(index, then state file, then retention). A save whose shard failed is dropped as a
whole: the other shards' data files are removed, the previous checkpoint stays latest,
training continues. Every wait on a worker has a timeout; a dead, failing or stuck
worker surfaces as ``WorkerFailedError(rank, cause, step)``, after any in-flight save
was abandoned (never half-committed).

Survivors stay (``heal``): after a worker failure only the lost workers are replaced;
the others keep their processes and roll back to the latest complete memory checkpoint
(``peer_memory``), the replacements restore from their peers' copies, storage being the
fallback when a rank and the holder of its copy are both gone. Every save's snapshot is
such a memory checkpoint, and ``checkpoint.memory_every_steps`` adds memory-only ones.

On preemption the emergency checkpoint is bounded by the notice's deadline
(``emergency.plan_emergency``): the in-flight save is finished or abandoned by then, and
the current step is saved only when a save fits in the time left.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from typing import Any, Callable, Collection, Mapping, Sequence

import ray
import ray.exceptions

from orchestrator.checkpoint import commit as commit_lib
from orchestrator.checkpoint import warm_start
from orchestrator.checkpoint.errors import CheckpointError, SaveFailedError, StateUpdateError
from orchestrator.checkpoint.storage import Storage
from orchestrator.cluster import recipe, shipping
from orchestrator.cluster.emergency import MARGIN_S, Tier, plan_emergency
from orchestrator.cluster.errors import (CheckpointingFailedError, ClusterError, HealError, NonFiniteLossError,
                                         RestoreError, WorkerFailedError)
from orchestrator.cluster.exchange import PeerFailedError
from orchestrator.cluster.peer_memory import PEER_MEMORY, STORAGE, MemoryTierError, PeerTier
from orchestrator.cluster.scaling_policy import worker_shape
from orchestrator.cluster.shard_save import ShardSaveFailed
from orchestrator.cluster.worker import remote_worker_class
from orchestrator.config import Device
from orchestrator.engine.data import DatasetError
from orchestrator.engine.protocol import PluginError

log = logging.getLogger(__name__)

# A plug-in that breaks the protocol or data that fails its checks fails the same way on every
# restart: the job stops (exit 1) instead of burning fault_tolerance.max_failures.
DETERMINISTIC_ERRORS = (PluginError, DatasetError)
START_TIMEOUT_FLOOR_S = 120.0  # actor start includes loading the dataset
CONTROL_TIMEOUT_S = 60.0       # small control calls (info, abandon)
CHUNK_SECONDS = 0.25           # a chunk of steps lasts about this long (preemption and save_every_secs latency)
MAX_CHUNK_STEPS = 1000
PEER_REPORT_SLACK = 0.5        # x step_timeout_s: a peer waiting on a hung rank says which one, after step_timeout_s
PROBE_TIMEOUT_S = 5.0          # after a failure: a worker that does not answer its liveness probe is lost
ROOM_CHECK_S = 2.0             # a replacement not up by then: is there room for it at all?


class CoordinatorState(str, enum.Enum):
    CREATED = "created"
    READY = "ready"
    FINISHED = "finished"
    PREEMPTED = "preempted"
    FAILED = "failed"
    SHUT_DOWN = "shut_down"


@dataclasses.dataclass
class JobResult:
    """What a finished (or preempted) job reports to the CLI."""

    steps_completed: int
    final_metrics: dict[str, float]
    checkpoints: list[str]
    failures_recovered: int = 0
    preempted: bool = False
    last_checkpoint: str | None = None
    emergency_tier: str | None = None  # preempted: where the current step went (storage, memory, none)


@dataclasses.dataclass
class SaveRecord:
    """One checkpoint attempt, as the coordinator saw it (benchmarks and tests read these)."""

    step: int
    prefix: str
    asynchronous: bool
    stall_s: float           # training blocked: starting + waiting for the snapshot (async), the whole save (sync)
    total_s: float = 0.0     # start of the save to commit
    nbytes: int = 0
    committed: bool = False
    error: str | None = None


@dataclasses.dataclass
class SavePolicy:
    """Save every ``every_steps`` steps and/or every ``every_secs`` seconds (0/None = off)."""

    every_steps: int = 0
    every_secs: float | None = None

    def reason(self, step: int, seconds_since_save: float) -> str | None:
        if self.every_steps and step % self.every_steps == 0:
            return f"save_every_steps={self.every_steps}"
        if self.every_secs and seconds_since_save >= self.every_secs:
            return f"save_every_secs={self.every_secs}"
        return None


@dataclasses.dataclass
class EvalPolicy:
    every_steps: int = 0

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0


@dataclasses.dataclass
class _InFlightSave:
    record: SaveRecord
    refs: list[Any]          # ObjectRef of each rank's ShardResult, rank order
    started: float
    metrics: dict[str, float]


class _NullReporter:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class Coordinator:
    """Drives M workers through training and checkpointing (see module docstring)."""

    worker_factory: Callable[[], Any] = staticmethod(remote_worker_class)  # test seam

    def __init__(self, config, num_workers: int | None = None, reporter: Any = None,
                 resume: str | None = None, clock: Callable[[], float] = time.monotonic, dataset: Any = None,
                 max_chunk_steps: int = MAX_CHUNK_STEPS):
        """``dataset``: the job's data already loaded (a ``Dataset`` or its ObjectRef); None loads it.
        ``max_chunk_steps``: the most steps per chunk (1: the driver sees, and can stop at, every step)."""
        self.config = shipping.absolute_paths(config)  # plug-in workers run in a copy of the job directory
        self.dataset = dataset
        self.num_workers = int(num_workers or config.workers.max)
        self.reporter = reporter or _NullReporter()
        self.resume = str(resume if resume is not None else config.resume)
        self.exchange = "nccl" if self._uses_gpu() and self.num_workers > 1 else "socket" if self.num_workers > 1 \
            else "local"  # how the workers combine a step (orchestrator.cluster.exchange)
        self.max_chunk_steps = int(max_chunk_steps)
        self._step_seconds: float | None = None  # the latest chunk's time per step (sizes the next chunk)
        self.clock = clock
        self.state = CoordinatorState.CREATED
        self.workers: list[Any] = []
        self.worker_info: list[dict] = []
        self.global_step = 0
        self.restored_from: str | None = None
        self.restore_info: list[dict] = []
        self.saves: list[SaveRecord] = []
        self.metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self._in_flight: _InFlightSave | None = None
        self.committed_step: int | None = None
        self.emergency_tier: Tier | None = None
        self.failed_saves_in_a_row = 0
        self._first_step = 0
        self._last_save_time = clock()
        self.last_progress = clock()   # end of the last completed step (or of start-up)
        self.workers_ready_at: float | None = None
        self.ready_at: float | None = None
        self.peers = PeerTier(lambda pairs, timeout, doing: self._wait_refs(list(pairs), self.global_step,
                                                                            timeout, doing))
        self.memory_every_steps = int(config.checkpoint.memory_every_steps or 0)
        self.restore_tier: str | None = None  # where the last restore came from: peer_memory | storage
        self.workers_replaced = 0             # by the last heal
        self._dataset_ref: Any = None
        self.spares: list[Any] = []  # fault_tolerance.spare_workers, idle until a worker is lost
        self._spares_starting: list[tuple[Any, Any]] = []  # (spare, its pending alive() ref)
        at_max = self.num_workers >= int(config.workers.max)  # below max, free room is for growing
        self.spare_count = int(config.fault_tolerance.spare_workers) if at_max else 0
        self.save_policy = SavePolicy(config.checkpoint.save_every_steps, config.checkpoint.save_every_secs)
        self.eval_policy = EvalPolicy(config.train.eval_every_steps)
        self.manager = recipe.checkpoint_manager(config)

    # ------------------------------------------------------------------ setup
    def _uses_gpu(self) -> bool:
        return self.config.device is Device.GPU

    @property
    def worker_node_ids(self) -> list[str]:
        return [info["node_id"] for info in self.worker_info]

    @property
    def step_timeout(self) -> float:
        return float(self.config.fault_tolerance.step_timeout_s)

    def _actor_options(self) -> dict:
        shape = worker_shape(self.config)  # the same per-worker resources the scaling policy counts
        options = {"num_cpus": shape.cpus, "num_gpus": shape.gpus, "max_restarts": 0}
        env = shipping.actor_runtime_env(self.config, ray.get_runtime_context().runtime_env)
        if env is not None:  # plug-in code: shipped to every worker, on every node
            options["runtime_env"] = env
        return options

    def _shared_dataset(self) -> Any:
        """An ObjectRef of the dataset: loaded once here, shared zero-copy by the workers of a node."""
        if isinstance(self.dataset, ray.ObjectRef):
            return self.dataset
        return ray.put(self.dataset if self.dataset is not None else recipe.load_data(self.config))

    def start(self) -> None:
        """Create the M actors, restore from a checkpoint when ``resume`` says so."""
        self._expect(CoordinatorState.CREATED)
        actor_cls = self.worker_factory()
        options = self._actor_options()
        dataset = self._dataset_ref = self._shared_dataset()
        self.workers = [actor_cls.options(**options).remote(self.config, rank, self.num_workers, dataset)
                        for rank in range(self.num_workers)]
        timeout = max(START_TIMEOUT_FLOOR_S, self.step_timeout)
        self.worker_info = self._get_all([w.info.remote() for w in self.workers], timeout, "starting")
        self.workers_ready_at = self.clock()
        prefix = self.resume_prefix()
        if prefix is not None:
            self._restore(prefix)
        elif self.config.init_from is not None:
            self._warm_start()
        self._memory_checkpoint(saved=False)  # a failure from here on heals from memory
        self._connect_workers(timeout)
        self._first_step = self.global_step
        self.state = CoordinatorState.READY
        self.ready_at = self.last_progress = self.clock()
        self._log_workers()
        self._start_spares()

    def _log_workers(self) -> None:
        """One line naming each rank's process and node (operators, and the chaos script, read it)."""
        log.info("workers: %s", ",".join(f"{r}={i['pid']}@{i['node_id'][:12]}" for r, i in enumerate(self.worker_info)))

    def _start_spares(self) -> None:
        """Start spare workers up to ``spare_count`` (not waited for: they come up in the background)."""
        missing = self.spare_count - len(self.spares)
        if missing > 0:
            actor_cls, options = self.worker_factory(), self._actor_options()
            fresh = [actor_cls.options(**options).remote(self.config, 0, self.num_workers, self._dataset_ref)
                     for _ in range(missing)]
            self.spares += fresh
            self._spares_starting += [(spare, spare.alive.remote()) for spare in fresh]

    def _poll_spares(self) -> None:
        """Log each spare once it is up (never blocks)."""
        if not self._spares_starting:
            return
        ready, _ = ray.wait([ref for _, ref in self._spares_starting], num_returns=len(self._spares_starting),
                            timeout=0, fetch_local=False)
        done = {ref.hex() for ref in ready}
        for spare, ref in [p for p in self._spares_starting if p[1].hex() in done]:
            try:
                log.info("spare worker up: pid %d", ray.get(ref, timeout=CONTROL_TIMEOUT_S))
            except ray.exceptions.RayError as exc:
                log.warning("a spare worker did not start: %s", exc)
        self._spares_starting = [p for p in self._spares_starting if p[1].hex() not in done]

    def _usable_spares(self) -> list[Any]:
        """The spares, those up first, then those still starting (ahead of a fresh actor all the
        same); dead ones (their node lost) are dropped."""
        if not self.spares:
            return []
        probes = [s.alive.remote() for s in self.spares]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=0.2)
        answered = {ref.hex() for ref in ready}
        up, starting = [], []
        for spare, probe in zip(self.spares, probes):
            if probe.hex() not in answered:
                starting.append(spare)
                continue
            try:
                ray.get(probe, timeout=CONTROL_TIMEOUT_S)
                up.append(spare)
            except ray.exceptions.RayError:
                ray.kill(spare, no_restart=True)
        self.spares, self._spares_starting = [], []
        return up + starting

    def _connect_workers(self, timeout: float) -> None:
        """Connect the workers' exchange; every rank then holds every owner's parameters."""
        addresses = self._get_all([w.exchange_address.remote() for w in self.workers], timeout, "connecting")
        self._get_all([w.exchange_connect.remote(addresses) for w in self.workers], timeout, "connecting")

    def resume_prefix(self) -> str | None:
        """The checkpoint to restore from, per ``resume``: auto | never | <prefix or directory>."""
        if self.resume == "never":
            return None
        if self.resume == "auto":
            return self.manager.latest_checkpoint
        return recipe.resume_target(self.config, self.resume)

    def _from_checkpoint(self, refs: list, what: str) -> list:
        """Results of restore/warm-start calls; the checkpoint's fault is raised as itself (bad input)."""
        timeout = max(START_TIMEOUT_FLOOR_S, self.step_timeout)
        try:
            return self._get_all(refs, timeout, what)
        except WorkerFailedError as exc:
            cause = getattr(exc.__cause__, "cause", None)
            if isinstance(cause, (RestoreError, CheckpointError)):  # the checkpoint, not the worker, is at fault
                raise cause from None
            raise

    def _warm_start(self) -> None:
        """``init_from``: every rank takes its owned variables from the resolved checkpoint; logs the plan."""
        cfg = self.config.init_from
        with warm_start.open_source(cfg.checkpoint, dict(cfg.storage_options)) as reader:
            prefix = reader.prefix  # a directory's latest, resolved once for every rank
        plans = self._from_checkpoint([w.warm_start.remote(prefix) for w in self.workers], "warm-starting")
        plan = warm_start.WarmStartPlan(**plans[0])
        for line in plan.lines():
            log.info("%s", line)
        log.info("%s", plan.summary())

    def _restore(self, prefix: str) -> None:
        self.restore_info = self._from_checkpoint([w.restore.remote(prefix) for w in self.workers], "restoring")
        steps = {info["global_step"] for info in self.restore_info}
        if len(steps) != 1:
            raise RestoreError(f"{prefix}: workers restored different steps {sorted(steps)}")
        self.global_step = steps.pop()
        self.committed_step = self.global_step
        self.restored_from = prefix
        self.restore_tier = STORAGE
        log.info("restored %s at step %d into %d workers", prefix, self.global_step, self.num_workers)

    # ------------------------------------------------------------------ running
    def run(self, stop_requested: Callable[[], bool] = lambda: False,
            deadline: Callable[[], float | None] = lambda: None) -> JobResult:
        """Train to ``train.steps``; on ``stop_requested()`` write the emergency checkpoint that
        fits before ``deadline()`` (``time.monotonic()`` seconds, None: no limit) and return preempted."""
        self._expect(CoordinatorState.READY)
        try:
            while self.global_step < self.config.train.steps:
                if stop_requested():
                    self._emergency_checkpoint(deadline())
                    self.state = CoordinatorState.PREEMPTED
                    return self.result()
                self.train_chunk(self.chunk_size(self.config.train.steps))
            self._final_eval()
            return self._stop(CoordinatorState.FINISHED)
        except (NonFiniteLossError, *DETERMINISTIC_ERRORS):
            self.state = CoordinatorState.FAILED
            self._finish_good_save()
            raise
        except BaseException:  # a worker failure, or anything else: never leave a save half-done
            self.state = CoordinatorState.FAILED
            self._abandon_in_flight()
            raise

    def _finish_good_save(self) -> None:
        """The job stops on a model or data error with every worker alive: a save in flight
        holds a step from before the error, so it is committed rather than thrown away."""
        try:
            self.finish_save()
        except Exception as exc:
            log.warning("the save in flight is abandoned (%s: %s)", type(exc).__name__, exc)
            self._abandon_in_flight()

    def step_once(self) -> dict[str, float]:
        """One global step on every worker, then the eval/save decisions for the new step."""
        return self.train_chunk(1)

    def advance(self, steps: int) -> dict[str, float]:
        """``steps`` more global steps, in chunks, acting on the policies between chunks."""
        target = self.global_step + steps
        while self.global_step < target:
            self.train_chunk(self.chunk_size(target))
        return self.metrics

    def chunk_size(self, until: int) -> int:
        """Steps in the next chunk: to the next step where a save or an evaluation is due, or
        ``until``, at most about ``CHUNK_SECONDS`` long (one step while the step time is unknown)."""
        step = self.global_step
        bounds = [until - step, self.max_chunk_steps]
        for every in (self.save_policy.every_steps, self.eval_policy.every_steps, self.memory_every_steps):
            if every:
                bounds.append(every - step % every)
        bounds.append(1 if self._step_seconds is None else max(1, int(CHUNK_SECONDS / self._step_seconds)))
        return max(1, min(bounds))

    def train_chunk(self, count: int) -> dict[str, float]:
        """Steps ``global_step .. +count-1`` on every worker (they exchange among themselves), then
        report each step and act on the eval/save decisions for the new step."""
        step, started = self.global_step, self.clock()
        refs = [w.train_steps.remote(step, count) for w in self.workers]
        # slack: the chunk's own expected time, and room for a waiting peer to report which rank hung
        slack = 2 * count * (self._step_seconds or 0.0) + PEER_REPORT_SLACK * self.step_timeout
        per_rank = self._wait_refs(list(enumerate(refs)), step, self.step_timeout, "training", slack=slack)
        done = len(per_rank[0])
        self.last_progress = self.clock()
        seconds = (self.last_progress - started) / max(1, done)
        self._step_seconds = seconds
        for index in range(done):
            self.global_step = step + index + 1
            self.metrics = aggregate_metrics([steps[index] for steps in per_rank], seconds)
            if not math.isfinite(self.metrics["loss"]):
                raise NonFiniteLossError(self.global_step, self.metrics["loss"], self.manager.latest_checkpoint)
            self._report_step()
        self.poll_save()
        self.peers.poll()
        self._poll_spares()
        if self.eval_policy.due(self.global_step):
            self.evaluate()
        reason = self.save_policy.reason(self.global_step, self.clock() - self._last_save_time)
        if reason:
            log.info("saving at step %d (%s)", self.global_step, reason)
            self.save(synchronous=not self.config.checkpoint.async_save)
        if self.memory_every_steps and self.global_step % self.memory_every_steps == 0:
            self._memory_checkpoint(saved=bool(reason))
        return self.metrics

    # ------------------------------------------------------------------ memory tier
    def _memory_checkpoint(self, saved: bool) -> None:
        """A complete memory checkpoint of the current step before training goes on: memory-only,
        or (``saved``) the memory part of the save just started. Waited for, so a failure loses
        at most ``checkpoint.memory_every_steps`` steps."""
        step = self.global_step
        if not saved:
            self.peers.wait(self.step_timeout)  # the previous one complete first (peer_memory._Slots.put)
            self._get_all([w.memory_snapshot.remote(step) for w in self.workers], self.step_timeout,
                          "taking a memory checkpoint")
            self.peers.replicate(step, self.workers, self.worker_node_ids)
        self.peers.wait(self.step_timeout)

    def heal(self, error: WorkerFailedError, start_timeout: float,
             room_for: Callable[[int], bool] = lambda lost: True) -> None:
        """After ``error``: replace only the lost workers, put every worker back to one step, READY again.

        Survivors roll back from their own memory checkpoint, replacements restore from their
        holder's copy (CRC-checked); if any lost rank's holder is lost too, or a copy is
        missing, every worker restores from the latest committed checkpoint in storage.
        Raises ``HealError`` (or ``WorkerFailedError``) when that cannot be done: the caller
        then restarts the whole job. ``room_for(n)``: whether the cluster has room for n
        replacements, asked when they are not up after ``ROOM_CHECK_S``.
        """
        self._expect(CoordinatorState.FAILED)
        self.peers.forget_pending()
        self._replace_ranks(self._lost_ranks(error), start_timeout, room_for)

    def evacuate(self, node_ids: Collection[str], deadline: float | None, start_timeout: float,
                 room_for: Callable[[int], bool] = lambda lost: True) -> bool:
        """A drain of some nodes whose deadline leaves no time for a storage save (``Tier.MEMORY``):
        a memory checkpoint of the current step, then the workers on those nodes are replaced
        elsewhere from their peers' copies, and training goes on. False when that does not apply
        (the caller then stops with an emergency checkpoint as usual)."""
        moving = {r for r, node in enumerate(self.worker_node_ids) if node in node_ids}
        if not moving or len(moving) == self.num_workers:
            return False
        left = None if deadline is None else deadline - time.monotonic()
        plan = plan_emergency(left, self._save_estimate(), memory_ok=True)
        if plan.tier is not Tier.MEMORY:
            return False
        self.finish_save(deadline)
        self._memory_checkpoint(saved=False)
        if not self.peers.can_restore(moving):
            return False
        log.warning("nodes %s drain: emergency checkpoint tier memory (%s); moving worker rank(s) %s",
                    ", ".join(sorted(node_ids)), plan.reason, sorted(moving))
        self.emergency_tier = Tier.MEMORY
        try:
            self._replace_ranks(moving, start_timeout, room_for)
        except HealError as exc:  # the moving workers are gone: recover as from their loss
            raise WorkerFailedError(min(moving), f"moving off a draining node failed: {exc}", self.global_step,
                                    "node_drained") from exc
        return True

    def _replace_ranks(self, lost: set[int], start_timeout: float, room_for: Callable[[int], bool]) -> None:
        log.warning("replacing worker rank(s) %s; %d worker(s) stay", sorted(lost), self.num_workers - len(lost))
        self._replace(lost, start_timeout, room_for)
        self.workers_ready_at = self.clock()
        self.workers_replaced = len(lost)
        if not self._restore_from_memory(lost):
            self._restore_from_storage()
        self._connect_workers(start_timeout)  # a fresh exchange mesh; every rank takes the owners' parameters
        self._first_step = self.global_step
        self.state = CoordinatorState.READY
        self.ready_at = self.last_progress = self.clock()
        self._log_workers()
        self._start_spares()
        log.warning("healed: %d worker(s) replaced, every worker at step %d (from %s)", len(lost),
                    self.global_step, self.restore_tier.replace("_", " "))

    def _lost_ranks(self, error: WorkerFailedError) -> set[int]:
        """Ranks whose process is gone (no answer to a liveness probe), plus a hung or failing rank."""
        probes = [w.alive.remote() for w in self.workers]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=PROBE_TIMEOUT_S)
        answered = {ref.hex() for ref in ready}
        lost = set()
        for rank, ref in enumerate(probes):
            try:
                if ref.hex() not in answered:
                    raise ray.exceptions.GetTimeoutError(f"no answer in {PROBE_TIMEOUT_S} s")
                ray.get(ref, timeout=CONTROL_TIMEOUT_S)
            except ray.exceptions.RayError:
                lost.add(rank)
        if error.kind in ("worker_hung", "worker_error", "node_drained") or not lost:
            lost.add(error.rank)
        return lost

    def _replace(self, lost: set[int], timeout: float, room_for: Callable[[int], bool]) -> None:
        for rank in lost:
            ray.kill(self.workers[rank], no_restart=True)
        actor_cls, options = self.worker_factory(), self._actor_options()
        spares, pending = self._usable_spares(), []
        for rank in sorted(lost):
            if spares:  # started already: only its rank's share to set up
                self.workers[rank] = spares.pop(0)
                pending.append((rank, self.workers[rank].become.remote(rank)))
            else:
                self.workers[rank] = actor_cls.options(**options).remote(self.config, rank, self.num_workers,
                                                                         self._dataset_ref)
                pending.append((rank, self.workers[rank].info.remote()))
        self.spares = spares
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # every ROOM_CHECK_S: is there room at all?
            ready, _ = ray.wait([ref for _, ref in pending], num_returns=len(pending), timeout=ROOM_CHECK_S)
            if len(ready) == len(pending):
                break
            if not room_for(len(lost)):
                raise HealError(f"no room in the cluster for {len(lost)} replacement worker(s)")
        try:
            infos = self._wait_refs(pending, self.global_step, timeout, "starting a replacement")
        except WorkerFailedError as exc:
            raise HealError(f"replacement worker(s) {sorted(lost)} did not start: {exc}") from exc
        for (rank, _), info in zip(pending, infos):
            self.worker_info[rank] = info

    def _restore_from_memory(self, lost: set[int]) -> bool:
        """Survivors roll back, replacements restore from peers; False: storage must do it."""
        step = self.peers.complete_step
        if not self.peers.can_restore(lost):
            log.warning("no complete memory checkpoint survives the loss of rank(s) %s (holders %s): "
                        "restoring from storage", sorted(lost), self.peers.holders)
            return False
        calls = []
        for rank, worker in enumerate(self.workers):
            if rank in lost:
                copy = self.workers[self.peers.holders[rank]].peer_shard.remote(rank, step)
                calls.append((rank, worker.restore_memory.remote(copy)))
            else:
                calls.append((rank, worker.rollback.remote(step)))
        try:
            self._wait_refs(calls, step, max(START_TIMEOUT_FLOOR_S, self.step_timeout), "restoring from memory")
        except (WorkerFailedError, MemoryTierError) as exc:
            log.warning("restoring step %d from memory failed (%s): restoring from storage", step, exc)
            return False
        self.global_step = step
        self.restore_tier = PEER_MEMORY
        self.peers.replicate(step, self.workers, self.worker_node_ids)  # copies for the new placement
        return True

    def _restore_from_storage(self) -> None:
        prefix = self.manager.latest_checkpoint
        if prefix is None:
            raise HealError("no memory checkpoint survived and none is committed in storage")
        self._restore(prefix)
        self._memory_checkpoint(saved=False)

    def _report_step(self) -> None:
        step, every = self.global_step, self.config.train.log_every_steps
        first = step == self._first_step + 1  # lets a supervisor time its recovery
        if first or step % every == 0 or step == self.config.train.steps:
            self.reporter.on_step(step, dict(self.metrics))

    def evaluate(self) -> dict[str, float]:
        ref = self.workers[0].evaluate.remote()  # every rank holds every parameter
        self.eval_metrics = self._get_all([ref], self.step_timeout, "evaluating")[0]
        self.reporter.on_eval(self.global_step, {k.removeprefix("eval_"): v for k, v in self.eval_metrics.items()})
        return self.eval_metrics

    def _final_eval(self) -> None:
        if not self.eval_policy.due(self.global_step):
            self.evaluate()

    def _stop(self, final: CoordinatorState) -> JobResult:
        """Finish the in-flight save, save the current step if it is not committed yet.

        A job whose last checkpoint did not commit does not end as done or preempted: it
        raises ``CheckpointingFailedError`` saying which steps are lost.
        """
        self.finish_save()
        if self.committed_step != self.global_step:
            self.save(synchronous=True)
        if self.committed_step != self.global_step:
            raise self._checkpointing_failed(f"the final checkpoint at step {self.global_step} did not commit")
        self.state = final
        return self.result()

    def _emergency_checkpoint(self, deadline: float | None) -> None:
        """Finish or abandon the in-flight save by ``deadline``, then save the current step in
        the tier that fits the time left (``emergency.plan_emergency``)."""
        self.finish_save(deadline)
        if self.committed_step == self.global_step:
            self.emergency_tier = Tier.STORAGE
            log.warning("preempted at step %d: that step is committed already", self.global_step)
            return
        left = None if deadline is None else deadline - time.monotonic()
        plan = plan_emergency(left, self._save_estimate())
        self.emergency_tier = plan.tier
        log.warning("preempted at step %d: emergency checkpoint tier %s (%s)", self.global_step,
                    plan.tier.value, plan.reason)
        if plan.tier is Tier.STORAGE:
            self.save(synchronous=False)
            self.finish_save(deadline)
            if self.committed_step != self.global_step:
                self.emergency_tier = Tier.NONE

    def _save_estimate(self) -> float | None:
        """Seconds a save took lately (the slowest of the last three committed), None before any."""
        recent = [r.total_s for r in self.saves if r.committed][-3:]
        return max(recent) if recent else None
    def _checkpointing_failed(self, what: str) -> CheckpointingFailedError:
        latest = self.manager.latest_checkpoint
        committed = commit_lib.step_of(latest) if latest else None
        lost = self.global_step - (committed or 0)
        since = f"the latest committed checkpoint is {latest}" if latest else "no checkpoint was ever committed"
        cause = next((r.error for r in reversed(self.saves) if r.error), "unknown cause")
        cause = " ".join(line.strip() for line in cause.splitlines())
        return CheckpointingFailedError(
            f"{what}: {cause}; {since}: the last {lost} step(s) of training are lost",
            self.global_step, latest, self.result())

    def result(self) -> JobResult:
        return JobResult(
            steps_completed=self.global_step,
            final_metrics={**self.metrics, **self.eval_metrics},
            checkpoints=list(self.manager.checkpoints),
            preempted=self.state == CoordinatorState.PREEMPTED,
            last_checkpoint=self.manager.latest_checkpoint,
            emergency_tier=self.emergency_tier.value if self.emergency_tier else None)

    # ------------------------------------------------------------------ saving
    def save(self, synchronous: bool) -> SaveRecord:
        """Start a save of the current step on every worker; commit now if ``synchronous``."""
        self.finish_save()  # at most one save in flight
        self.peers.wait(self.step_timeout)  # its snapshot is the next memory checkpoint: the previous one first
        step, started = self.global_step, self.clock()
        record = SaveRecord(step, self.manager.prefix_for(step), not synchronous, stall_s=0.0)
        self.saves.append(record)
        in_flight = _InFlightSave(record, [], started, {**self.metrics, **self.eval_metrics})
        self._in_flight = in_flight  # from here on, a failure abandons this save's files
        starts = [w.start_save.remote(step, record.prefix, not synchronous) for w in self.workers]
        if synchronous:  # the shards are written inside start_save
            self._get_all(starts, self.step_timeout, "writing a save", step)
        # async: not waited for; actor calls run in order, so the next step starts after it, and
        # its errors reach us through wait_save
        in_flight.refs = [w.wait_save.remote(step, self._save_timeout()) for w in self.workers]
        self.peers.replicate(step, self.workers, self.worker_node_ids)  # the snapshot is a memory checkpoint too
        record.stall_s = self.clock() - started
        self._last_save_time = started
        if synchronous:
            self.finish_save()
            record.stall_s = self.clock() - started
        return record

    def poll_save(self) -> None:
        """Commit (or drop) the in-flight save if every shard is done, without blocking training."""
        if self._in_flight is None:
            return
        ready, _ = ray.wait(self._in_flight.refs, num_returns=len(self._in_flight.refs), timeout=0)
        if len(ready) == len(self._in_flight.refs):
            self.finish_save()

    def finish_save(self, deadline: float | None = None) -> None:
        """Wait for every shard of the in-flight save (if any), at most until ``deadline``
        (``time.monotonic()`` seconds); commit it, or drop it whole."""
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return
        results, failures = self._collect_shards(pending, deadline)
        if failures:
            self._drop_save(pending, results, failures)
            return
        self._commit(pending, results)

    def _collect_shards(self, pending: _InFlightSave, until: float | None = None) -> tuple[list, dict[int, str]]:
        results, failures, blocked = [], {}, [0.0]
        deadline = time.monotonic() + self._save_timeout() + CONTROL_TIMEOUT_S  # shards write in parallel: one deadline
        late = f"shard write did not finish within {self._save_timeout()} s"
        if until is not None and until - MARGIN_S < deadline:
            deadline, late = until - MARGIN_S, "shard write would not finish before the preemption deadline"
        for rank, ref in enumerate(pending.refs):
            try:
                result, blocked_s = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                results.append(result)
                blocked.append(blocked_s)
            except ray.exceptions.RayTaskError as exc:
                failures[rank] = _task_cause(exc)
            except ray.exceptions.GetTimeoutError:
                failures[rank] = late
            except ray.exceptions.RayError as exc:
                self._in_flight = pending
                raise WorkerFailedError(rank, f"died while saving: {exc}", pending.record.step,
                                        self._death_kind(rank)) from exc
        if pending.record.asynchronous:
            pending.record.stall_s += max(blocked)  # a worker waited for its snapshot before updating
        return results, failures

    def _save_timeout(self) -> float:
        return max(self.step_timeout, float(self.config.fault_tolerance.grace_period_s))

    def _commit(self, pending: _InFlightSave, results: Sequence[Any]) -> None:
        record = pending.record
        try:
            self.manager.commit(record.step, results, metrics=pending.metrics)
        except SaveFailedError as exc:  # e.g. the index write failed: nothing was committed
            self._drop_save(pending, results, exc.failures)
            return
        except StateUpdateError as exc:  # committed (the next start adopts it), but the state file is stale
            record.committed = True
            self._save_failed(pending, exc, "the state file may still name the previous checkpoint")
            return
        record.total_s = self.clock() - pending.started
        record.nbytes = sum(r.nbytes for r in results)
        record.committed = True
        self.committed_step = record.step
        self.failed_saves_in_a_row = 0
        self.reporter.on_checkpoint(record.step, record.total_s, record.nbytes)

    def _drop_save(self, pending: _InFlightSave, results: Sequence[Any], failures: Mapping[Any, Any]) -> None:
        """A shard failed: remove the shards that were written; the previous checkpoint stays latest."""
        error = SaveFailedError(pending.record.prefix, failures)
        storage, _ = Storage.for_path(self.config.checkpoint.dir, recipe.checkpoint_options(self.config))
        commit_lib.remove_data(results, storage)
        self._save_failed(pending, error, "the previous checkpoint stays the latest")

    def _save_failed(self, pending: _InFlightSave, error: CheckpointError, consequence: str) -> None:
        """Record a failed save; fail the job after ``checkpoint.max_consecutive_failures`` in a row."""
        pending.record.error = str(error)
        pending.record.total_s = self.clock() - pending.started
        self.failed_saves_in_a_row += 1
        limit = int(self.config.checkpoint.max_consecutive_failures)
        log.error("%s; %s (%d of checkpoint.max_consecutive_failures=%d in a row)", error, consequence,
                  self.failed_saves_in_a_row, limit)
        if self.failed_saves_in_a_row >= limit:
            raise self._checkpointing_failed(
                f"{self.failed_saves_in_a_row} checkpoint saves in a row failed "
                f"(checkpoint.max_consecutive_failures={limit})")

    def _abandon_in_flight(self) -> None:
        """After a failure: make sure nothing of the in-flight save is left or committed."""
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return
        pending.record.error = "abandoned after a failure"
        try:
            refs = [w.abandon_save.remote(pending.record.step) for w in self.workers]
            ray.wait(refs, num_returns=len(refs), timeout=CONTROL_TIMEOUT_S)
        finally:
            self.manager.cleanup_uncommitted()  # whatever a dead worker left behind

    # ------------------------------------------------------------------ waiting
    def _wait_refs(self, pending: Sequence[tuple[int, Any]], step: int, timeout: float, doing: str,
                   slack: float = 0.0) -> list:
        """The values of every (rank, ref), in order, waiting ``timeout + slack`` seconds.

        The rank at fault: the first failure in submission order that is not a peer's report
        (a worker's own error or death), then a rank that did not answer, then what a peer
        reported about another rank (``PeerFailedError``: died or hung in the exchange)."""
        refs = [ref for _, ref in pending]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout + slack, fetch_local=False)
        if len(ready) == len(refs):
            try:  # the common case: one batched get per wait, not one get per ref
                return ray.get(refs, timeout=CONTROL_TIMEOUT_S)
            except ray.exceptions.RayError:
                pass  # find the rank at fault below
        ready_ids = {r.hex() for r in ready}
        reported = []
        for rank, ref in pending:
            if ref.hex() in ready_ids:
                failure, by_peer = self._failure(rank, ref, step)
                if failure is not None and not by_peer:
                    raise failure
                if failure is not None:
                    reported.append(failure)
        for rank, ref in pending:
            if ref.hex() not in ready_ids:
                raise WorkerFailedError(rank, f"no answer within {timeout:g} s while {doing} "
                                              f"(fault_tolerance.step_timeout_s={self.step_timeout:g})", step,
                                        "worker_hung")
        if reported:
            raise reported[0]
        return ray.get(refs, timeout=CONTROL_TIMEOUT_S)  # every ref succeeded on its own

    def _failure(self, rank: int, ref: Any, step: int) -> tuple[BaseException | None, bool]:
        """(the error ``ref`` ended with, mapped to the rank at fault, or None; whether a peer reported it)."""
        try:
            ray.get(ref, timeout=CONTROL_TIMEOUT_S)
            return None, False
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, DETERMINISTIC_ERRORS):  # a restart would fail the same way
                return cause, False
            if isinstance(cause, PeerFailedError):
                return _chained(self._peer_failure(cause, step), exc), True
            return _chained(WorkerFailedError(rank, _task_cause(exc), step), exc), False
        except ray.exceptions.RayError as exc:
            return _chained(WorkerFailedError(rank, f"worker died ({type(exc).__name__}: {exc})", step,
                                              self._death_kind(rank)), exc), False

    def _peer_failure(self, report: PeerFailedError, step: int) -> WorkerFailedError:
        """What rank ``report.rank`` saw of rank ``report.peer`` in the exchange, as that peer's failure."""
        at = report.step if report.step >= 0 else step
        if report.hung:
            return WorkerFailedError(report.peer, f"no answer within {self.step_timeout:g} s while training "
                                                  f"(fault_tolerance.step_timeout_s={self.step_timeout:g}; "
                                                  f"reported by rank {report.rank})", at, "worker_hung")
        return WorkerFailedError(report.peer, f"worker died (rank {report.rank} lost its connection: "
                                              f"{report.cause})", at, self._death_kind(report.peer))

    def _death_kind(self, rank: int) -> str:
        """``node_lost`` when the dead worker's node is gone too, else ``worker_died``."""
        node = self.worker_info[rank]["node_id"] if rank < len(self.worker_info) else None
        try:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        except Exception:  # the GCS query is best effort; the failure itself is what matters
            return "worker_died"
        return "node_lost" if node is not None and node not in alive else "worker_died"

    def _get_all(self, refs: Sequence[Any], timeout: float, doing: str, step: int | None = None) -> list:
        """``ray.get`` of one ref per rank, failures mapped to ``WorkerFailedError``."""
        step = self.global_step if step is None else step
        return self._wait_refs(list(enumerate(refs)), step, timeout, doing)

    # ------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Finish or abandon an in-flight save, then kill the actors (idempotent)."""
        if self.state == CoordinatorState.SHUT_DOWN:
            return
        try:
            if self._in_flight is not None:
                self.finish_save()
        except Exception as exc:  # a dead worker or a storage error: abandon, and never mask the caller's error
            log.warning("shutdown: the in-flight save is abandoned (%s: %s)", type(exc).__name__, exc)
            self._abandon_in_flight()
        finally:
            for worker in self.workers + self.spares:
                ray.kill(worker, no_restart=True)
            self.state = CoordinatorState.SHUT_DOWN

    def _expect(self, *states: CoordinatorState) -> None:
        if self.state not in states:
            raise ClusterError(f"coordinator is {self.state.value}; expected {[s.value for s in states]}")


def aggregate_metrics(per_rank: Sequence[Mapping[str, Any]], seconds: float) -> dict[str, float]:
    """Global loss (and accuracy, unless a model reports no ``num_correct``) of one step from
    each rank's sums; a model's extra metrics (per-example sums) become means too."""
    examples = sum(m["examples"] for m in per_rank)
    metrics = {"loss": sum(m["loss_sum"] for m in per_rank) / examples}
    if all(m.get("num_correct") is not None for m in per_rank):
        metrics["accuracy"] = sum(m["num_correct"] for m in per_rank) / examples
    for name in sorted({k for m in per_rank for k in m.get("sums", {})}):
        metrics[name] = sum(m.get("sums", {}).get(name, 0.0) for m in per_rank) / examples
    metrics.update(step_time=seconds, examples_per_sec=examples / seconds if seconds > 0 else 0.0)
    return metrics


def _chained(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def _task_cause(exc: Any) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ShardSaveFailed):
        return cause.cause
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__

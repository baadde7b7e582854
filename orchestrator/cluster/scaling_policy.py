"""Scaling policy: how many workers the job runs with, given what the cluster has free.

A worker actor needs ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs on ONE node,
so capacity is counted per node (floor of free/needed) and summed over the alive,
non-draining nodes. The job runs with the largest M' in ``[workers.min, workers.max]``
that fits; with fewer than ``min`` it waits up to ``min_workers_timeout_s`` and then
fails with an error that says what was needed and what was there.

The policy only decides; ``probe_ray_capacity`` is the one function that asks Ray.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from typing import Callable, Sequence

from orchestrator import rules
from orchestrator.cluster.errors import ClusterError
from orchestrator.config import Device, JobConfig

logger = logging.getLogger(__name__)

_EPS = 1e-9
WAIT_LOG_INTERVAL_S = 30.0  # while waiting for capacity: a line when the reason changes, else this often


class InsufficientWorkersError(ClusterError):
    """Fewer than ``workers.min`` workers fit in the cluster before the deadline."""


@dataclasses.dataclass(frozen=True)
class WorkerShape:
    """Resources one worker actor asks Ray for."""

    cpus: float
    gpus: float = 0.0


@dataclasses.dataclass(frozen=True)
class NodeCapacity:
    """Free resources of one alive node."""

    node_id: str
    cpus: float
    gpus: float = 0.0
    draining: bool = False


class ScalingKind(str, enum.Enum):
    RUN = "run"
    WAIT = "wait"


@dataclasses.dataclass(frozen=True)
class ScalingDecision:
    kind: ScalingKind
    num_workers: int
    fits: int
    reason: str


def workers_that_fit(nodes: Sequence[NodeCapacity], shape: WorkerShape, cap: int) -> int:
    """How many workers of ``shape`` fit on ``nodes`` (at most ``cap``)."""
    total = sum(_fit_on_node(node, shape, cap) for node in nodes if not node.draining)
    return min(total, cap)


def _fit_on_node(node: NodeCapacity, shape: WorkerShape, cap: int) -> int:
    limits = [cap]
    if shape.cpus > 0:
        limits.append(math.floor(node.cpus / shape.cpus + _EPS))
    if shape.gpus > 0:
        limits.append(math.floor(node.gpus / shape.gpus + _EPS))
    return max(0, min(limits))


class ScalingPolicy:
    """Chooses M' in ``[min_workers, max_workers]`` from the free capacity."""

    def __init__(self, min_workers: int, max_workers: int, shape: WorkerShape,
                 min_workers_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        rules.check_worker_range(min_workers, max_workers)
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.shape = shape
        self.min_workers_timeout_s = float(min_workers_timeout_s)
        self._clock = clock
        self._sleep = sleep

    @classmethod
    def from_config(cls, config: JobConfig, **overrides) -> "ScalingPolicy":
        """Builds the policy from a ``JobConfig`` (workers, resources, fault_tolerance)."""
        return cls(config.workers.min, config.workers.max, worker_shape(config),
                   config.fault_tolerance.min_workers_timeout_s, **overrides)

    def decide(self, nodes: Sequence[NodeCapacity], held: int = 0) -> ScalingDecision:
        """Sizes the job; ``held`` = workers the job already runs (their resources are
        in use, so they count on top of what is free)."""
        fits = workers_that_fit(nodes, self.shape, self.max_workers) + held
        fits = min(fits, self.max_workers)
        if fits < self.min_workers:
            return ScalingDecision(ScalingKind.WAIT, 0, fits,
                                   f"{fits} worker(s) fit, workers.min={self.min_workers}")
        return ScalingDecision(ScalingKind.RUN, fits, fits,
                               f"{fits} worker(s) fit in [{self.min_workers}, "
                               f"{self.max_workers}]")

    def should_grow(self, current: int, nodes: Sequence[NodeCapacity]) -> int | None:
        """The larger M' to restart with at a checkpoint boundary, or None to stay."""
        if current >= self.max_workers:
            return None
        decision = self.decide(nodes, held=current)
        return decision.num_workers if decision.num_workers > current else None

    def wait_for_workers(self, probe: Callable[[], Sequence[NodeCapacity]],
                         poll_s: float = 0.5,
                         cancelled: Callable[[], bool] = lambda: False) -> int:
        """Polls ``probe`` until at least ``min`` workers fit; returns M' (0 if
        ``cancelled()`` turned True while waiting).

        Logs "waiting for capacity" when the reason changes and every
        ``WAIT_LOG_INTERVAL_S`` otherwise, not once per poll.
        Raises InsufficientWorkersError after ``min_workers_timeout_s``.
        """
        started = self._clock()
        deadline = started + self.min_workers_timeout_s
        said: tuple[str, float] | None = None  # (reason, when) of the last line logged
        while True:
            if cancelled():
                return 0
            decision = self.decide(probe())
            if decision.kind is ScalingKind.RUN:
                logger.info("scaling: running with %d worker(s) (%s)",
                            decision.num_workers, decision.reason)
                return decision.num_workers
            now = self._clock()
            if now >= deadline:
                raise InsufficientWorkersError(self._timeout_message(decision))
            if said is None or said[0] != decision.reason or now - said[1] >= WAIT_LOG_INTERVAL_S:
                logger.warning("scaling: waiting for capacity: %s (%.0f s of %.0f s)", decision.reason,
                               now - started, self.min_workers_timeout_s)
                said = (decision.reason, now)
            self._sleep(poll_s)

    def _timeout_message(self, decision: ScalingDecision) -> str:
        return (f"only {decision.fits} worker(s) of {self.shape.cpus:g} CPU / "
                f"{self.shape.gpus:g} GPU fit in the cluster, but workers.min="
                f"{self.min_workers}; waited fault_tolerance.min_workers_timeout_s="
                f"{self.min_workers_timeout_s:g}s. Add nodes, or lower workers.min or "
                f"resources.cpus_per_worker / gpus_per_worker")


def worker_shape(config: JobConfig) -> WorkerShape:
    """The per-worker resources of a ``JobConfig`` (gpus null => 1 on gpu, else 0)."""
    gpus = config.resources.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if config.device is Device.GPU else 0.0
    return WorkerShape(cpus=float(config.resources.cpus_per_worker), gpus=float(gpus))


def probe_ray_capacity() -> list[NodeCapacity]:
    """Free resources of every alive node of the connected Ray cluster.

    Nodes that Ray is draining (preemption, idle termination) count as no capacity.
    """
    from ray._private import state as ray_state  # developer API: per-node free resources

    draining = draining_node_ids()
    free = ray_state.available_resources_per_node()
    return [NodeCapacity(node_id=node_id, cpus=float(res.get("CPU", 0.0)),
                         gpus=float(res.get("GPU", 0.0)), draining=node_id in draining)
            for node_id, res in free.items()]


def probe_ray_totals() -> list[NodeCapacity]:
    """Total resources of every alive node (draining ones count as none): what the cluster could
    hold at all, whoever holds it now (a replacement worker asks this, not what is free)."""
    import ray

    draining = draining_node_ids()
    return [NodeCapacity(node_id=n["NodeID"], cpus=float(n["Resources"].get("CPU", 0.0)),
                         gpus=float(n["Resources"].get("GPU", 0.0)), draining=n["NodeID"] in draining)
            for n in ray.nodes() if n.get("Alive")]


def draining_node_ids() -> set[str]:
    """Hex ids of the nodes Ray is draining; empty when the query is unavailable."""
    return set(draining_nodes())


def draining_nodes() -> dict[str, int]:
    """Node hex id -> drain deadline (Unix milliseconds, 0 = none) of the nodes Ray is draining;
    empty when the query is unavailable."""
    try:
        from ray._private import state as ray_state

        return {str(k): int(v) for k, v in ray_state.state.get_draining_nodes().items()}
    except Exception as exc:  # Ray not connected, or no GCS draining query in this version
        logger.debug("could not query Ray draining nodes: %s", exc)
        return {}

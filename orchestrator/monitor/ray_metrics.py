"""Recovery metrics through Ray's metrics API (``ray.util.metrics``).

Ray exports them, prefixed ``ray_``, on the Prometheus endpoint each node already serves
(the metrics export port; Ray's dashboard and Grafana read it too):

* ``orchestrator_failures_total{job, kind}``: failures seen;
* ``orchestrator_recovery_seconds{job, kind, tier, phase}``: one observation per
  recovery for each phase (detect, replace, restore, first_step) and the total;
* ``orchestrator_recovery_steps_lost{job, kind, tier}``: steps recomputed per recovery.

Ray is imported only when a metric is recorded, and only if it is initialised: the
reporter works without Ray (tests, tools) and then records nothing here.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.monitor.recovery import PHASES, RecoveryRecord

logger = logging.getLogger(__name__)

SECONDS_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]
STEPS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]


class RayRecoveryMetrics:
    """Records failures and recoveries of one job (tag ``job``) with ``ray.util.metrics``."""

    def __init__(self, job: str):
        self.job = job
        self._metrics: dict[str, Any] | None = None

    def failure(self, kind: str) -> None:
        metrics = self._ensure()
        if metrics:
            metrics["failures"].inc(1, tags={"job": self.job, "kind": kind})

    def recovery(self, record: RecoveryRecord) -> None:
        metrics = self._ensure()
        if not metrics:
            return
        tags = {"job": self.job, "kind": record.kind, "tier": record.tier}
        for phase in PHASES:
            metrics["seconds"].observe(getattr(record, phase), tags={**tags, "phase": phase.removesuffix("_s")})
        metrics["seconds"].observe(record.total_s, tags={**tags, "phase": "total"})
        metrics["steps_lost"].observe(record.steps_lost, tags=tags)

    def _ensure(self) -> dict[str, Any] | None:
        """The metric objects, defined on first use once Ray runs ({} if they cannot be)."""
        if self._metrics is None and _ray_running():
            self._metrics = _define()
        return self._metrics


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _define() -> dict[str, Any]:
    from ray.util import metrics

    try:
        return {
            "failures": metrics.Counter("orchestrator_failures_total", "failures of workers or nodes seen by the job",
                                        tag_keys=("job", "kind")),
            "seconds": metrics.Histogram("orchestrator_recovery_seconds", "seconds per recovery phase",
                                         boundaries=SECONDS_BOUNDARIES, tag_keys=("job", "kind", "tier", "phase")),
            "steps_lost": metrics.Histogram("orchestrator_recovery_steps_lost", "steps recomputed per recovery",
                                            boundaries=STEPS_BOUNDARIES, tag_keys=("job", "kind", "tier")),
        }
    except Exception as exc:  # metrics are best effort: never fail a job over them
        logger.warning("Ray metrics unavailable: %s", exc)
        return {}

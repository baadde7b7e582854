"""Typed errors of the Ray runtime.

One base, ``ClusterError``. Every error pickles with its fields (``__reduce__``), so it
crosses Ray actor boundaries and the fault-tolerance supervisor can inspect it.
Messages name the rank, the step and the cause, and where possible the fix.
"""

from __future__ import annotations

from orchestrator.errors import OrchestratorError


class ClusterError(OrchestratorError):
    """Base of every error raised by ``orchestrator.cluster``."""


class WorkerFailedError(ClusterError):
    """A worker died, raised, or did not finish a step within ``step_timeout_s``.

    ``kind``: ``worker_died`` (its process is gone), ``node_lost`` (with its node),
    ``worker_hung`` (no answer in time) or ``worker_error`` (it raised).
    """

    def __init__(self, rank: int, cause: str, step: int, kind: str = "worker_error"):
        super().__init__(f"worker rank {rank} failed at step {step}: {cause}")
        self.rank = rank
        self.cause = cause
        self.step = step
        self.kind = kind

    def __reduce__(self):
        return (type(self), (self.rank, self.cause, self.step, self.kind))


class CheckpointSaveError(ClusterError):
    """One or more shards of a distributed save failed; nothing of that save was committed."""

    def __init__(self, step: int, failures: dict[int | str, str]):
        """``failures``: shard rank (or "commit" for the index/state write) -> cause."""
        causes = "; ".join(f"{_part(key)}: {cause}" for key, cause in sorted(failures.items(), key=str))
        super().__init__(f"checkpoint save at step {step} failed ({causes})")
        self.step = step
        self.failures = dict(failures)

    def __reduce__(self):
        return (type(self), (self.step, self.failures))


def _part(key: int | str) -> str:
    return f"shard {key}" if isinstance(key, int) else str(key)


class RestoreError(ClusterError, ValueError):
    """A checkpoint cannot be restored into this job (missing tensor, other model, bad shape)."""


class ClusterSetupError(ClusterError, ValueError):
    """The job cannot start on this cluster as configured (e.g. local checkpoints on many nodes)."""


class NonFiniteLossError(ClusterError):
    """The training loss became NaN or inf: the job stops; nothing of that state is saved."""

    def __init__(self, step: int, loss: float, last_checkpoint: str | None):
        kept = f"{last_checkpoint} stays the latest checkpoint" if last_checkpoint else "no checkpoint was committed"
        super().__init__(f"training loss is {loss} at step {step}; the job stops ({kept})")
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint

    def __reduce__(self):
        return (type(self), (self.step, self.loss, self.last_checkpoint))

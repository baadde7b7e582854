"""Typed errors of the Ray runtime.

One base, ``ClusterError``. Every error pickles with its fields (``__reduce__``), so it
crosses Ray actor boundaries and the fault-tolerance supervisor can inspect it.
Messages name the rank, the step and the cause, and where possible the fix.
"""

from __future__ import annotations

from orchestrator.errors import BadInputError, OrchestratorError


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


class CheckpointingFailedError(ClusterError):
    """Checkpoints stopped committing, so the job stops instead of losing work silently (exit 1).

    Raised when ``checkpoint.max_consecutive_failures`` saves in a row failed, or when the
    job's last checkpoint (at the end of training, or the emergency one on preemption)
    did not commit. ``result`` is the job's state at that point (steps done, checkpoints
    kept, the latest committed one), for the run summary.
    """

    def __init__(self, message: str, step: int, last_checkpoint: str | None, result=None):
        super().__init__(message)
        self.step, self.last_checkpoint, self.result = step, last_checkpoint, result

    def __reduce__(self):
        return (type(self), (self.message, self.step, self.last_checkpoint, self.result))


class HealError(ClusterError):
    """Replacing only the lost workers did not work (no capacity, nothing to restore): restart the job."""


class RestoreError(ClusterError, BadInputError, ValueError):
    """A checkpoint cannot be restored into this job (missing tensor, other model, bad shape)."""


class ClusterSetupError(ClusterError, BadInputError, ValueError):
    """The job cannot start on this cluster as configured (e.g. local checkpoints on many nodes)."""


class NonFiniteLossError(ClusterError):
    """The training loss became NaN or inf: the job stops; nothing of that state is saved."""

    def __init__(self, step: int, loss: float, last_checkpoint: str | None):
        kept = f"{last_checkpoint} stays the latest checkpoint" if last_checkpoint else "no checkpoint was committed"
        super().__init__(f"training loss is {loss} at step {step}; the job stops ({kept})")
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint

    def __reduce__(self):
        return (type(self), (self.step, self.loss, self.last_checkpoint))

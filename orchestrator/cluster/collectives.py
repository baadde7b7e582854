"""How one training step moves parameters to every worker and gradients to their owners.

Two collectives, one small interface (``Collective``), chosen by the coordinator:

* ``ObjectStoreCollective`` (CPU, the default). The coordinator routes object refs;
  the bytes travel through Ray's object store. *Broadcast*: each owner's latest params
  (the return value of its ``apply_grads``) are passed to every worker's next
  ``compute_grads``. *Reduce to owners*: ``compute_grads`` returns one gradient dict per
  owner (``num_returns=M+1``), and owner j's ``apply_grads`` receives the dicts of ranks
  0..M-1 **in rank order** and sums them in that order, so the result never depends on
  which worker finished first.
* ``NcclCollective`` (GPU). The workers talk to each other directly through
  ``cupy.cuda.nccl``: ``ncclBcast`` from each variable's owner, ``ncclReduce`` of each
  gradient to its owner. The NCCL unique id is created by worker 0 and handed out by
  the coordinator. NCCL's reduction order is fixed for a given communicator and size,
  so results are repeatable for the same M (not bit-equal to the object-store path).
  cupy is imported only inside the workers that use it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class StepHandles:
    """What one submitted step will produce: per-rank metrics, plus every ref to wait on."""

    metrics: list[Any]
    pending: list[tuple[int, Any]]  # (rank that produces it, ObjectRef)


class Collective(abc.ABC):
    """Submits the worker calls of one step; the coordinator waits on the returned refs."""

    name: str = "abstract"

    @abc.abstractmethod
    def attach(self, workers: Sequence[Any], timeout: float) -> None:
        """Bind to a fresh (or restored) set of workers before the first step."""

    @abc.abstractmethod
    def train_step(self, step: int) -> StepHandles:
        """Submit step ``step`` (0-based count of completed steps) on every worker."""

    @abc.abstractmethod
    def evaluate(self) -> Any:
        """Submit an evaluation of the current parameters; an ObjectRef of a metrics dict."""


class ObjectStoreCollective(Collective):
    """Broadcast params and reduce gradients through Ray's object store (CPU)."""

    name = "object_store"

    def __init__(self) -> None:
        self.workers: list[Any] = []
        self.params: list[Any] = []  # ObjectRef of owner j's params, j = 0..M-1

    def attach(self, workers: Sequence[Any], timeout: float) -> None:
        self.workers = list(workers)
        self.params = [w.owned_params.remote() for w in self.workers]

    def train_step(self, step: int) -> StepHandles:
        world = len(self.workers)
        outputs = [w.compute_grads.options(num_returns=world + 1).remote(step, *self.params)
                   for w in self.workers]
        metrics = [out[0] for out in outputs]
        applied = [owner.apply_grads.options(num_returns=2).remote(step, *reduce_inputs(outputs, j))
                   for j, owner in enumerate(self.workers)]
        self.params = [params for _, params in applied]
        acks = [ack for ack, _ in applied]  # tiny: waiting on them never pulls params to the driver
        return StepHandles(metrics, list(enumerate(metrics)) + list(enumerate(acks)))

    def evaluate(self) -> Any:
        return self.workers[0].evaluate.remote(*self.params)


def reduce_inputs(outputs: Sequence[Sequence[Any]], owner: int) -> list[Any]:
    """Owner ``owner``'s gradient refs from ranks 0..M-1, in rank order (the summation order)."""
    return [out[1 + owner] for out in outputs]


class NcclCollective(Collective):
    """Broadcast and reduce with NCCL between GPU workers (``cupy.cuda.nccl``)."""

    name = "nccl"

    def __init__(self) -> None:
        self.workers: list[Any] = []

    def attach(self, workers: Sequence[Any], timeout: float) -> None:
        import ray

        self.workers = list(workers)
        unique_id = ray.get(self.workers[0].nccl_unique_id.remote(), timeout=timeout)
        ray.get([w.nccl_setup.remote(unique_id) for w in self.workers], timeout=timeout)

    def train_step(self, step: int) -> StepHandles:
        metrics = [w.nccl_train_step.remote(step) for w in self.workers]
        return StepHandles(metrics, list(enumerate(metrics)))

    def evaluate(self) -> Any:
        refs = [w.nccl_evaluate.remote() for w in self.workers]  # every rank joins the broadcast
        return refs[0]


def make_collective(device_is_gpu: bool, num_workers: int) -> Collective:
    """NCCL for multi-GPU jobs, the object store otherwise."""
    if device_is_gpu and num_workers > 1:
        return NcclCollective()
    return ObjectStoreCollective()


# ---------------------------------------------------------------------- worker side (GPU)
class NcclGroup:
    """One rank's NCCL communicator; arrays are cupy arrays on this worker's GPU."""

    def __init__(self, world_size: int, unique_id: Any, rank: int):
        from cupy.cuda import nccl

        self._nccl = nccl
        self.rank = rank
        self.comm = nccl.NcclCommunicator(world_size, unique_id, rank)

    @staticmethod
    def new_unique_id() -> Any:
        from cupy.cuda import nccl

        return nccl.get_unique_id()

    def broadcast(self, arrays: Sequence[Any], roots: Sequence[int]) -> None:
        """In place: ``arrays[i]`` takes the value held by rank ``roots[i]``."""
        stream = _current_stream_ptr()
        self._nccl.groupStart()
        for array, root in zip(arrays, roots):
            self.comm.bcast(array.data.ptr, array.size, self._dtype(array), root, stream)
        self._nccl.groupEnd()

    def reduce_to_owners(self, grads: Sequence[Any], roots: Sequence[int], out: Sequence[Any]) -> None:
        """Sum ``grads[i]`` over ranks into ``out[i]`` on rank ``roots[i]``."""
        stream = _current_stream_ptr()
        self._nccl.groupStart()
        for grad, root, dst in zip(grads, roots, out):
            self.comm.reduce(grad.data.ptr, dst.data.ptr, grad.size, self._dtype(grad),
                             self._nccl.NCCL_SUM, root, stream)
        self._nccl.groupEnd()

    def _dtype(self, array: Any) -> int:
        codes = {np.dtype(np.float32): self._nccl.NCCL_FLOAT32, np.dtype(np.float64): self._nccl.NCCL_FLOAT64,
                 np.dtype(np.float16): self._nccl.NCCL_FLOAT16, np.dtype(np.int64): self._nccl.NCCL_INT64,
                 np.dtype(np.int32): self._nccl.NCCL_INT32}
        return codes[np.dtype(array.dtype)]


def _current_stream_ptr() -> int:
    import cupy

    return cupy.cuda.get_current_stream().ptr

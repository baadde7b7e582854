"""NCCL between GPU workers (``cupy.cuda.nccl``), used by ``exchange.NcclExchange``.

``ncclBcast`` from each variable's owner, ``ncclReduce`` of each gradient to its owner.
The NCCL unique id is created by rank 0 and handed out by the coordinator through the
exchange's connect handshake. cupy is imported only inside the workers that use it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


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

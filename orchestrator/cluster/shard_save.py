"""One worker's side of a checkpoint save: snapshot what it owns, write its data shard.

Why a snapshot: the optimizer updates variables in place, so the values of step ``s``
must be copied before the next update. In async mode the copy runs in the background
thread, overlapping the next gradient computation (which only reads the variables);
the worker waits for it only before applying the next update. The copy goes into fresh host
buffers (pinned host memory on GPU, from cupy's pinned pool, so the device-to-host copy is a
fast DMA): the snapshot outlives the write, because it is also this rank's memory
checkpoint (``peer_memory``; ``on_snapshot`` hands it over), kept until a newer one is
complete. At most one save is in flight per worker: starting the next save first waits for
the previous write to end.

Async mode writes the shard in a background thread; the worker keeps training. The
write's outcome (a ``ShardResult`` or the error) is kept until the coordinator asks for
it with ``wait``: a failed write fails that save, loudly, and nothing is committed
because only the coordinator writes the index, after every shard reported success.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from typing import Any, Callable, Mapping

import numpy as np

from orchestrator.checkpoint import bundle, pipeline
from orchestrator.checkpoint.errors import SaveFailedError
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.variables import to_host


OnSnapshot = Callable[[Mapping[str, np.ndarray]], None]


def _hand_over(on_snapshot: OnSnapshot, taken: Mapping[str, np.ndarray], step: int) -> None:
    """Give the snapshot to the memory tier; its failure costs that tier one step, never the save."""
    try:
        on_snapshot(taken)
    except Exception:  # noqa: BLE001 - logged with its traceback; the shard is still written
        print(f"memory checkpoint of step {step} not kept:", flush=True)
        traceback.print_exc()


class ShardSaveFailed(SaveFailedError):
    """This worker's shard of one save failed: a ``SaveFailedError`` with one failure.

    The cause travels as text (it crosses the Ray actor boundary); the coordinator merges
    the failures of every rank into the one ``SaveFailedError`` of that save.
    """

    def __init__(self, step: int, rank: int, cause: str, prefix: str = ""):
        self.rank, self.cause = rank, cause
        SaveFailedError.__init__(self, prefix or f"the save at step {step}", {rank: cause})
        self.message = f"shard {rank} of the save at step {step} failed: {cause}"
        self._step = step

    @property
    def step(self) -> int:
        return self._step

    def __reduce__(self):
        return (type(self), (self._step, self.rank, self.cause, self.prefix))


class HostSnapshot:
    """Host copies of arrays (pinned when on GPU), fresh for every save: the memory tier keeps them."""

    def take(self, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for name, array in arrays.items():
            buf = _empty_host_like(array)
            _copy_to_host(array, buf)  # device -> host sync point on GPU
            out[name] = buf
        return out


def _is_cupy(array: Any) -> bool:
    return type(array).__module__.startswith("cupy")


def _empty_host_like(array: Any) -> np.ndarray:
    dtype, shape = np.dtype(array.dtype), tuple(array.shape)
    if not _is_cupy(array):
        return np.empty(shape, dtype)
    import cupy  # only on the GPU path

    nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
    mem = cupy.cuda.alloc_pinned_memory(nbytes)
    return np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)


def _copy_to_host(array: Any, out: np.ndarray) -> None:
    if _is_cupy(array):
        array.get(out=out)
    else:
        np.copyto(out, to_host(array))


@dataclasses.dataclass
class _PendingSave:
    step: int
    prefix: str
    thread: threading.Thread | None = None
    result: bundle.ShardResult | None = None
    error: str | None = None
    seconds: float = 0.0
    blocked_s: float = 0.0  # training waited for the snapshot this long
    snapshot_taken: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class ShardSaver:
    """Writes this worker's shard of each checkpoint, synchronously or in a background thread.

    Call sequence per save:
    1. (training thread) ``start``: waits for the previous save's write to end, then
       snapshots and writes (async: both in a background thread);
    2. (training thread) ``wait_snapshot`` before the next in-place update;
    3. (any thread) ``wait``: the ShardResult, or ShardSaveFailed with the cause.
    """

    def __init__(self, rank: int, storage_options: Mapping[str, Any] | None, fsync: bool):
        self.rank = rank
        self.storage_options = dict(storage_options or {})
        self.fsync = fsync
        self._snapshot = HostSnapshot()
        self._pending: _PendingSave | None = None
        self._started = threading.Condition()  # wait() may be called before start() ran

    def start(self, step: int, prefix: str, num_shards: int,
              arrays: Mapping[str, Any], extras: Mapping[str, np.ndarray],
              asynchronous: bool, on_snapshot: OnSnapshot | None = None) -> None:
        """Snapshot ``arrays`` (+ host ``extras``) and write them as shard ``rank``;
        ``on_snapshot(copies)`` receives the host copies of ``arrays`` once taken.

        Async: returns at once; the background thread takes the snapshot first, then
        writes. The caller must call ``wait_snapshot()`` before it next modifies ``arrays``
        (the worker does so before applying the next update), so the copy overlaps
        the next gradient computation instead of stalling training.
        """
        self.finish_previous()
        pending = _PendingSave(step, prefix)
        with self._started:
            self._pending = pending
            self._started.notify_all()
        if asynchronous:
            run = lambda: self._snapshot_and_write(pending, num_shards, arrays, extras, on_snapshot)  # noqa: E731
            pending.thread = threading.Thread(target=run, name=f"shard-save-{step}", daemon=True)
            pending.thread.start()
        elif on_snapshot is not None:  # the copies are kept: take them, write from them
            self._snapshot_and_write(pending, num_shards, arrays, extras, on_snapshot)
        else:  # training waits anyway: write straight from the arrays (host copy only on GPU)
            live = {n: a for n, a in arrays.items() if not _is_cupy(a)}
            self._snapshot_and_write(pending, num_shards, {n: a for n, a in arrays.items() if n not in live},
                                     {**extras, **live})

    def wait_snapshot(self) -> None:
        """Block until the in-flight save has copied what it writes (training may then update).

        The time blocked here is training stalled by the save; it is reported with the result.
        """
        pending = self._pending
        if pending is not None and not pending.snapshot_taken.is_set():
            started = time.perf_counter()
            pending.snapshot_taken.wait()
            pending.blocked_s += time.perf_counter() - started

    def blocked_seconds(self, step: int) -> float:
        pending = self._pending
        return pending.blocked_s if pending is not None and pending.step == step else 0.0

    def finish_previous(self) -> None:
        """Block until the in-flight write (if any) ended; its outcome stays available."""
        pending = self._pending
        if pending is not None and pending.thread is not None:
            pending.thread.join()

    def wait(self, step: int, timeout: float | None = None) -> bundle.ShardResult:
        """The ShardResult of the save at ``step``; raises ShardSaveFailed if it failed.

        May be called (from another thread) before ``start`` of that step ran.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._started:
            self._started.wait_for(lambda: self._pending is not None and self._pending.step >= step, timeout)
        pending = self._pending
        if pending is None or pending.step != step:
            raise ShardSaveFailed(step, self.rank, "no save of this step was started on this worker")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not pending.done.wait(left):
            raise ShardSaveFailed(step, self.rank, f"write still running after {timeout} s", pending.prefix)
        if pending.error is not None:
            raise ShardSaveFailed(step, self.rank, pending.error, pending.prefix)
        return pending.result

    def last_write_seconds(self) -> float:
        pending = self._pending
        return pending.seconds if pending is not None else 0.0

    def _snapshot_and_write(self, pending: _PendingSave, num_shards: int, arrays: Mapping[str, Any],
                            extras: Mapping[str, np.ndarray], on_snapshot: OnSnapshot | None = None) -> None:
        started = time.perf_counter()
        try:
            try:
                taken = self._snapshot.take(arrays)
                tensors = {**taken, **extras}
            finally:
                pending.snapshot_taken.set()
            if on_snapshot is not None:
                _hand_over(on_snapshot, taken, pending.step)
            storage, prefix = Storage.for_path(pending.prefix, self.storage_options, self.fsync)
            pending.result = pipeline.write_shard(storage, prefix, self.rank, num_shards, tensors)
        except BaseException as exc:  # any failure fails this save, never the worker
            pending.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            pending.seconds = time.perf_counter() - started
            pending.done.set()

    def abandon(self, step: int) -> None:
        """Wait for the write of ``step`` to end, then remove its data file (never committed)."""
        self.finish_previous()
        pending = self._pending
        if pending is None or pending.step != step or pending.result is None:
            return
        storage, _ = Storage.for_path(pending.prefix, self.storage_options, self.fsync)
        storage.rm(pending.result.data_path)
        pending.result = None
        pending.error = "abandoned"


"""The peer-memory checkpoint tier: recover from a lost worker without reading storage.

Why: restarting every worker from storage costs seconds (new processes, a full read),
while the state a replacement needs already sits in host memory, because every save
copies it there first. So that copy is kept, and a second copy of it is held by
another worker, on another node when there is one:

* **Own shard** (``MemoryShard``): one rank's owned variables and optimizer slots at one
  step, as host copies, with the masked CRC32C of each tensor's bytes (the value the
  checkpoint index records for that tensor) and the rank's position (step, data
  iterator, seed). A storage save makes it from the snapshot it writes (no extra copy);
  ``checkpoint.memory_every_steps`` makes memory-only ones between storage saves.
* **Peer copy**: the shard of one other rank (``assign_holders``: rank r's shard is held
  by a rank on a different node when possible), sent through Ray's object store between
  the job's own actors and copied into the holder's memory.

A memory checkpoint of step s is *complete* once every rank holds its own shard of s and
every holder acknowledged its peer copy of s (``PeerTier``). After a failure the survivors
roll back to the latest complete step from their own shard (they keep their processes and
datasets); a replacement restores from its holder's peer copy after checking every CRC, so
it has the same bytes as the committed checkpoint. When a rank and its holder are both
gone, every rank restores from storage instead.

Memory bound, per worker: one own shard and one peer copy of the latest complete step, plus,
while the next one is being taken, the next own shard (the snapshot an async save writes
from, which the save needed anyway) and the next peer copy. So at most 2 own + 2 peer
shards at the peak, one of each in between (``MemoryTier.nbytes``; measured in
``tests/cluster/test_peer_memory.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint.crc import masked_crc32c
from orchestrator.cluster.errors import ClusterError

log = logging.getLogger(__name__)

PEER_MEMORY = "peer_memory"
STORAGE = "storage"


class MemoryTierError(ClusterError):
    """A memory checkpoint is missing or does not verify: the caller falls back to storage."""


@dataclasses.dataclass
class MemoryShard:
    """One rank's checkpointed state at one step, in host memory (see module docstring)."""

    step: int
    rank: int
    num_workers: int
    tensors: dict[str, np.ndarray]
    crcs: dict[str, int]
    position: dict  # {"global_step", "iterator", "seed"}: JSON values only

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.tensors.values())

    def verify(self) -> None:
        """Every tensor's bytes match the CRC taken when the shard was made."""
        bad = sorted(n for n, a in self.tensors.items() if masked_crc32c(_bytes_of(a)) != self.crcs.get(n))
        if bad or set(self.crcs) != set(self.tensors):
            raise MemoryTierError(f"memory copy of rank {self.rank} at step {self.step}: CRC mismatch "
                                  f"in {bad or sorted(set(self.crcs) ^ set(self.tensors))}")

    def copy(self) -> "MemoryShard":
        """A copy in this process's own memory (a received shard may be a read-only view of Ray's store)."""
        tensors = {n: np.array(a, copy=True) for n, a in self.tensors.items()}
        return dataclasses.replace(self, tensors=tensors, crcs=dict(self.crcs),
                                   position=json.loads(json.dumps(self.position)))


def make_shard(step: int, rank: int, num_workers: int, tensors: Mapping[str, np.ndarray],
               position: Mapping[str, Any]) -> MemoryShard:
    """A shard of host ``tensors`` (already copies, never aliases of live variables)."""
    tensors = dict(tensors)
    crcs = {n: masked_crc32c(_bytes_of(a)) for n, a in tensors.items()}
    return MemoryShard(step, rank, num_workers, tensors, crcs, json.loads(json.dumps(dict(position))))


def _bytes_of(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class _Slots:
    """The latest complete shard of one source and the one being taken after it."""

    def __init__(self) -> None:
        self.complete: MemoryShard | None = None
        self.pending: MemoryShard | None = None

    def put(self, shard: MemoryShard) -> None:
        """The coordinator starts a memory checkpoint only once the previous one is complete
        (``PeerTier.wait`` first), so a newer shard arriving makes the pending one complete."""
        pending = self.pending
        if pending is not None and pending.step < shard.step:
            self.complete = pending
        self.pending = shard

    def complete_at(self, step: int) -> None:
        if self.pending is not None and self.pending.step == step:
            self.complete, self.pending = self.pending, None
        elif self.pending is not None and self.pending.step < step:
            self.pending = None

    def find(self, step: int) -> MemoryShard | None:
        return next((s for s in (self.pending, self.complete) if s is not None and s.step == step), None)

    def shards(self) -> list[MemoryShard]:
        return [s for s in (self.complete, self.pending) if s is not None]


class MemoryTier:
    """What one worker holds: its own shards and the peer copies of one other rank (thread safe:
    the save thread adds own shards, the actor's io group serves peers)."""

    def __init__(self) -> None:
        self._own = _Slots()
        self._peer = _Slots()
        self._changed = threading.Condition()

    def put_own(self, shard: MemoryShard) -> None:
        with self._changed:
            self._own.put(shard)
            self._changed.notify_all()

    def own(self, step: int, timeout: float = 0.0) -> MemoryShard:
        """This rank's shard of ``step``; waits up to ``timeout`` for a save thread still taking it."""
        with self._changed:
            self._changed.wait_for(lambda: self._own.find(step) is not None, timeout)
            shard = self._own.find(step)
        if shard is None:
            raise MemoryTierError(f"no memory checkpoint of step {step} on this worker")
        return shard

    def hold_peer(self, shard: MemoryShard) -> int:
        """Keep a copy of another rank's shard (a holder keeps one rank's copies only)."""
        mine = shard.copy()
        with self._changed:
            held = self._peer.shards()
            if held and held[0].rank != shard.rank:
                self._peer = _Slots()
            self._peer.put(mine)
        return mine.nbytes

    def peer(self, rank: int, step: int) -> MemoryShard:
        with self._changed:
            shard = self._peer.find(step)
        if shard is None or shard.rank != rank:
            raise MemoryTierError(f"no peer copy of rank {rank} at step {step} on this worker")
        return shard

    def complete(self, step: int) -> None:
        """The memory checkpoint of ``step`` is complete everywhere: older shards go."""
        with self._changed:
            self._own.complete_at(step)
            self._peer.complete_at(step)

    def adopt(self, shard: MemoryShard) -> None:
        """A replacement restored from ``shard``: it is this rank's complete own shard now."""
        with self._changed:
            self._own = _Slots()
            self._own.complete = shard

    def nbytes(self) -> dict[str, int]:
        with self._changed:
            return {"own": sum(s.nbytes for s in self._own.shards()),
                    "peer": sum(s.nbytes for s in self._peer.shards())}


# ---------------------------------------------------------------------- driver side
def assign_holders(node_ids: Sequence[str]) -> list[int]:
    """``holders[r]``: the rank keeping rank r's peer copy, on another node whenever possible.

    Ranks are ordered by node; each rank's copy goes to the rank that many places further in
    that ring, where "that many" is the largest number of ranks on one node, so the holder is
    on another node unless one node hosts more than half of the ranks. One node only: the
    next rank (another process still survives a process's death).
    """
    world = len(node_ids)
    if world < 2:
        return [0] * world
    order = sorted(range(world), key=lambda r: (node_ids[r], r))
    largest = max(sum(1 for n in node_ids if n == node) for node in set(node_ids))
    shift = largest if largest < world else 1
    holders = [0] * world
    for i, rank in enumerate(order):
        holders[rank] = order[(i + shift) % world]
    return holders


@dataclasses.dataclass
class _Replication:
    step: int
    holders: list[int]
    acks: list[tuple[int, Any]]  # (holder rank, ObjectRef of its acknowledgement)
    started: float


WaitRefs = Callable[[Sequence[tuple[int, Any]], float, str], list]


class PeerTier:
    """The coordinator's view of the memory tier: which step is complete, who holds what.

    ``replicate(step)`` asks every worker for its shard of ``step`` and hands it to its
    holder; ``poll``/``wait`` mark the step complete once every copy is acknowledged.
    """

    def __init__(self, wait_refs: WaitRefs):
        """``wait_refs(pairs, timeout, doing)``: the coordinator's wait on (rank, ref) pairs,
        failures mapped to ``WorkerFailedError`` of that rank."""
        self._wait_refs = wait_refs
        self.complete_step: int | None = None
        self.holders: list[int] = []
        self.nbytes = 0  # bytes of the latest complete memory checkpoint (every rank's shard)
        self._pending: _Replication | None = None
        self._workers: list[Any] = []

    def replicate(self, step: int, workers: Sequence[Any], node_ids: Sequence[str]) -> None:
        """Start copying every rank's shard of ``step`` (taken, or being taken) to its holder."""
        holders = assign_holders(node_ids)
        self._workers = list(workers)
        shards = [w.memory_shard.remote(step) for w in workers]  # the holders keep copies of these
        acks = [(h, workers[h].hold_peer.remote(shards[r])) for r, h in enumerate(holders)]
        self._pending = _Replication(step, holders, acks, time.monotonic())

    def poll(self) -> None:
        """Mark the replication complete if every copy is acknowledged (never blocks)."""
        import ray

        pending = self._pending
        if pending is None:
            return
        refs = [ref for _, ref in pending.acks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        if len(ready) == len(refs):
            self.wait(0.0)

    def wait(self, timeout: float) -> None:
        """Wait for the replication in flight (if any). A worker failure raises (the previous
        step stays complete); so does a copy that did not arrive in time."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        sizes = self._wait_refs(pending.acks, timeout, "copying memory checkpoints to peers")
        self.complete_step, self.holders = pending.step, pending.holders
        self.nbytes = int(sum(sizes))
        for worker in self._workers:  # fire and forget: the older shards can go
            worker.memory_complete.remote(pending.step)
        log.debug("memory checkpoint of step %d complete: %d bytes in %.3f s", pending.step, self.nbytes,
                  time.monotonic() - pending.started)

    def forget_pending(self) -> None:
        """After a failure: a replication in flight is not waited for (it may never complete)."""
        self._pending = None

    def can_restore(self, lost: set[int]) -> bool:
        """A complete step exists and no lost rank lost its holder too."""
        if self.complete_step is None or not self.holders:
            return False
        return all(self.holders[r] not in lost for r in lost)


# ---------------------------------------------------------------------- worker side
class PeerMemoryWorker:
    """The memory tier's calls on a worker (mixed into ``TrainWorker``, which provides
    ``owned_arrays``, ``position``, ``set_position``, ``_assign`` and ``saver``)."""

    memory: MemoryTier

    def memory_snapshot(self, step: int) -> int:
        """Take a memory-only checkpoint of ``step`` (host copies; no storage write)."""
        self._check_step(step)
        host = {n: np.array(self.backend.to_host(a), copy=True) for n, a in self.owned_arrays().items()}
        shard = make_shard(step, self.rank, self.num_workers, host, self.position())
        self.memory.put_own(shard)
        return shard.nbytes

    def save_snapshot_hook(self, step: int) -> Callable[[Mapping[str, np.ndarray]], None]:
        """For a storage save of ``step``: its snapshot becomes this rank's memory shard (no extra copy)."""
        position = self.position()  # now, in the training thread: the snapshot is of this step
        rank, world = self.rank, self.num_workers
        return lambda taken: self.memory.put_own(make_shard(step, rank, world, taken, position))

    def memory_shard(self, step: int, timeout: float = 60.0) -> MemoryShard:
        return self.memory.own(step, timeout)

    def hold_peer(self, shard: MemoryShard) -> int:
        return self.memory.hold_peer(shard)

    def peer_shard(self, rank: int, step: int) -> MemoryShard:
        return self.memory.peer(rank, step)

    def memory_complete(self, step: int) -> None:
        self.memory.complete(step)

    def memory_nbytes(self) -> dict[str, int]:
        return self.memory.nbytes()

    def rollback(self, step: int) -> int:
        """A survivor goes back to ``step`` from its own shard (its process and data stay)."""
        self._load_shard(self.memory.own(step, 0.0))
        return self.global_step

    def restore_memory(self, shard: MemoryShard) -> int:
        """A replacement takes the state of its rank from a peer's copy, every CRC checked."""
        if shard.rank != self.rank or shard.num_workers != self.num_workers:
            raise MemoryTierError(f"rank {self.rank} of {self.num_workers} was given the memory copy of rank "
                                  f"{shard.rank} of {shard.num_workers}")
        shard.verify()
        mine = shard.copy()
        self._load_shard(mine)
        self.memory.adopt(mine)
        return self.global_step

    def _load_shard(self, shard: MemoryShard) -> None:
        owned = self.owned_arrays()
        if set(shard.tensors) != set(owned):
            raise MemoryTierError(f"rank {self.rank}: the memory copy of step {shard.step} holds "
                                  f"{sorted(set(shard.tensors) ^ set(owned))} that this rank does not own")
        self.saver.finish_previous()
        for name, value in shard.tensors.items():
            self._assign(name, np.array(value, copy=True))  # the shard stays intact: updates are in place
        self.set_position(shard.position)

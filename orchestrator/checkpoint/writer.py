"""``write_checkpoint``: a whole checkpoint from one process, sharded and written in parallel.

Tensors are spread over ``num_shards`` data files balanced by bytes (largest first onto
the least-loaded shard, ties by name then shard id, so the layout is deterministic);
the shards are written by parallel threads, then the index commits the checkpoint.
The state file is not touched (that is the Saver's/manager's job).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np

from orchestrator.checkpoint import bundle
from orchestrator.checkpoint.errors import InvalidCheckpointWriteError
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.variables import Variable, to_host

MAX_WRITER_THREADS = 8


def plan_shards(sizes: Mapping[str, int], num_shards: int) -> list[list[str]]:
    """Names per shard, balanced by bytes: greedy, largest first to the least-loaded shard."""
    loads = [0] * num_shards
    plan: list[list[str]] = [[] for _ in range(num_shards)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        target = min(range(num_shards), key=lambda i: (loads[i], i))
        plan[target].append(name)
        loads[target] += sizes[name]
    return [sorted(names) for names in plan]


def _write_shard(prefix: str, shard_id: int, num_shards: int, storage: Storage,
                 tensors: Mapping[str, np.ndarray], names: list[str]) -> bundle.ShardResult:
    with bundle.ShardWriter(prefix, shard_id, num_shards, storage) as writer:
        for name in names:
            writer.add(name, tensors[name])
        return writer.finish()


def write_checkpoint(prefix: str, tensors: Mapping[str, Any], num_shards: int = 1,
                     storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``tensors`` as a complete checkpoint at ``prefix``; returns ``prefix``.

    Values are numpy (or cupy) arrays or ``Variable``s; object arrays of ``bytes``/``str``
    are stored as DT_STRING (numpy ``S`` arrays drop trailing NULs, as numpy does). If any shard fails, every shard already written is removed.
    """
    if num_shards < 1:
        raise InvalidCheckpointWriteError(f"{prefix}: num_shards must be >= 1, got {num_shards}")
    storage, path = Storage.for_path(prefix, storage_options)
    arrays = {name: _host_array(value) for name, value in tensors.items()}
    plan = plan_shards({name: a.nbytes for name, a in arrays.items()}, num_shards)
    with ThreadPoolExecutor(max_workers=min(num_shards, MAX_WRITER_THREADS)) as pool:
        futures = [pool.submit(_write_shard, path, i, num_shards, storage, arrays, names)
                   for i, names in enumerate(plan)]
        outcomes = [_outcome(f) for f in futures]
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    results = [o for o in outcomes if isinstance(o, bundle.ShardResult)]
    if failures:
        _remove_shards(storage, results)
        raise failures[0]
    try:
        bundle.write_index(path, results, storage)
    except BaseException:
        _remove_shards(storage, results)
        raise
    return os.fspath(prefix)


def _host_array(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, Variable) else np.asarray(to_host(value))


def _outcome(future) -> Any:
    try:
        return future.result()
    except BaseException as exc:  # collected, so every shard is settled before we clean up
        return exc


def _remove_shards(storage: Storage, results: list[bundle.ShardResult]) -> None:
    for result in results:
        storage.rm(result.data_path)

"""The one save pipeline: plan -> write shards -> commit.

Every way of saving goes through these functions: ``write_checkpoint``, ``Saver.save`` and
``CheckpointManager.save`` in one process (``save``), and the runtime, where each worker
writes its own shard with ``write_shard`` and the coordinator commits them all
(``commit.commit_index``). So a checkpoint has the same bytes whoever wrote it, a failure
is the same ``SaveFailedError`` naming every failed shard and its cause, and a failed save
leaves nothing behind, whichever entry point it came through.

* plan: ``plan_shards`` spreads tensors over shards balanced by bytes (largest first onto
  the least-loaded shard, ties by name then shard id, so the layout is deterministic);
  the runtime plans by variable ownership instead, one shard per worker.
* write: ``write_shard`` writes one data file, tensors in name order, atomically; on any
  error it removes what it wrote. ``write_shards`` runs them in parallel threads and, if
  any fails, removes the others too.
* commit: ``commit.commit_index`` checks every shard and writes the index, the commit point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint import bundle, commit
from orchestrator.checkpoint.errors import InvalidCheckpointWriteError, SaveFailedError, UnsupportedDtypeError
from orchestrator.checkpoint.storage import TEMP_MARKER, Storage
from orchestrator.checkpoint.variables import Variable, to_host

MAX_WRITER_THREADS = 8
_CALLER_ERRORS = (InvalidCheckpointWriteError, UnsupportedDtypeError)


def check_prefix(prefix: str) -> None:
    """Refuse a save path that ends in a separator: it names a directory, not a checkpoint prefix.

    Normalised, ``run/ckpt/`` would become the prefix ``run/ckpt``: its files would land next to
    the directory and the Saver would replace the parent directory's state file.
    """
    text = os.fspath(prefix)
    if text.endswith(("/", os.sep)):
        raise InvalidCheckpointWriteError(
            f"save path {text!r} ends with a separator and names a directory; give a checkpoint prefix "
            f"inside it, e.g. {text + 'model.ckpt'!r}")


def plan_shards(sizes: Mapping[str, int], num_shards: int) -> list[list[str]]:
    """Names per shard, balanced by bytes: greedy, largest first to the least-loaded shard."""
    if num_shards < 1:
        raise InvalidCheckpointWriteError(f"num_shards must be >= 1, got {num_shards}")
    loads = [0] * num_shards
    plan: list[list[str]] = [[] for _ in range(num_shards)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        target = min(range(num_shards), key=lambda i: (loads[i], i))
        plan[target].append(name)
        loads[target] += sizes[name]
    return [sorted(names) for names in plan]


def host_arrays(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Host (numpy) copies of numpy/cupy arrays and ``Variable`` values, by name."""
    return {name: value.numpy() if isinstance(value, Variable) else np.asarray(to_host(value))
            for name, value in tensors.items()}


def write_shard(storage: Storage, prefix: str, shard_id: int, num_shards: int,
                tensors: Mapping[str, Any]) -> bundle.ShardResult:
    """Write ``tensors`` (in name order) as data shard ``shard_id`` of ``num_shards``.

    The file appears whole or not at all; on any error what was written is removed and
    the error re-raised.
    """
    writer = bundle.ShardWriter(prefix, shard_id, num_shards, storage)
    try:
        for name in sorted(tensors):
            writer.add(name, tensors[name])
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def write_shards(storage: Storage, prefix: str, tensors: Mapping[str, Any],
                 num_shards: int) -> list[bundle.ShardResult]:
    """Plan and write every shard in parallel threads: all succeed, or none is left behind.

    Raises ``SaveFailedError`` naming each failed shard and its cause, or the
    ``InvalidCheckpointWriteError``/``UnsupportedDtypeError`` of tensors that no retry can save.
    """
    arrays = host_arrays(tensors)
    plan = plan_shards({name: a.nbytes for name, a in arrays.items()}, num_shards)
    with ThreadPoolExecutor(max_workers=min(num_shards, MAX_WRITER_THREADS)) as pool:
        futures = [pool.submit(write_shard, storage, prefix, i, num_shards, {n: arrays[n] for n in names})
                   for i, names in enumerate(plan)]
    results, failures = [], {}
    for shard_id, future in enumerate(futures):
        error = future.exception()  # every shard settles before anything is cleaned up
        if error is None:
            results.append(future.result())
        else:
            failures[shard_id] = error
    if failures:
        commit.remove_data(results, storage)
        misuse = [e for e in failures.values() if isinstance(e, _CALLER_ERRORS)]
        if misuse:  # the tensors themselves cannot be saved: the caller's error, not a failed save
            raise misuse[0]
        raise SaveFailedError(prefix, failures)
    return results


def save(storage: Storage, prefix: str, tensors: Mapping[str, Any], num_shards: int) -> list[bundle.ShardResult]:
    """Write and commit a whole checkpoint from one process; returns the shards' results.

    Raises ``SaveFailedError`` (nothing committed, nothing left behind) if any shard or the
    index fails. The state file is not touched (the Saver's and the manager's job).
    """
    if storage.exists(commit.index_path(prefix)):
        return _save_over(storage, prefix, tensors, num_shards)
    results = write_shards(storage, prefix, tensors, num_shards)
    commit.commit_index(prefix, results, storage)
    return results


def _save_over(storage: Storage, prefix: str, tensors: Mapping[str, Any],
               num_shards: int) -> list[bundle.ShardResult]:
    """Replace the committed checkpoint at ``prefix`` (a Saver saving without ``global_step``).

    Written in place, the new shards would replace the old data files one by one, and a
    shard failing after another had landed would leave the old index over missing or
    foreign data. So the shards are written and checked under a staging prefix in the
    same directory (``<prefix>.tmp-<hex>``: uncommitted data that start-up cleanup
    removes after a crash); only when all of them are whole is the old index removed,
    the shards renamed into place and the new index written. A failure while writing
    leaves the old checkpoint untouched.
    """
    staging = f"{prefix}{TEMP_MARKER}{secrets.token_hex(6)}"
    try:
        staged = write_shards(storage, staging, tensors, num_shards)
    except SaveFailedError as exc:
        raise SaveFailedError(prefix, exc.failures) from None
    try:
        commit.check_shards(staging, staged, storage)
    except SaveFailedError as exc:
        commit.remove_data(staged, storage)
        raise SaveFailedError(prefix, exc.failures) from None
    old_data = [path for path, _, count in commit.DirectoryListing.of(storage.dirname(prefix), storage)
                .data.get(prefix, []) if count != num_shards]  # an old layout the new files do not replace
    try:
        storage.rm(commit.index_path(prefix))  # uncommit the old checkpoint: its data files are replaced next
    except Exception as exc:
        commit.remove_data(staged, storage)
        raise SaveFailedError(prefix, {"index": exc}) from exc
    results = []
    for shard in staged:
        final = bundle.data_filename(prefix, shard.shard_id, shard.num_shards)
        try:
            storage.rename(shard.data_path, final)
        except Exception as exc:
            commit.remove_data(staged + results, storage)
            raise SaveFailedError(prefix, {shard.shard_id: exc}) from exc
        results.append(dataclasses.replace(shard, data_path=final))
    commit.commit_index(prefix, results, storage)
    for path in old_data:  # best effort: the new checkpoint is committed already
        with contextlib.suppress(Exception):
            storage.rm(path)
    return results


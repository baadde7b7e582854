"""``CheckpointManager``: numbered checkpoints in one directory, with retention.

TF ``tf.train.CheckpointManager`` semantics (reference 7.4) plus keep-best-k by a
reported metric. What survives a restart: the state file (paths, timestamps,
``last_preserved_timestamp``, readable by TensorFlow) and a small JSON sidecar,
``<latest_filename>.manager.json``, with what TF has no field for (per-checkpoint
step, metrics, why it is kept, preserved checkpoints, deletions in progress).

Call sequence of one save (see ``commit`` for why this order is crash safe)::

    (all writers)  shards            -> on_phase("shards_written")
    (coordinator)  index             -> on_phase("index_written")   # commit point
    (coordinator)  sidecar, state    -> on_phase("state_written")
    (coordinator)  deletions         -> on_phase("deleting") between index and data
                                     -> on_phase("done")

Files in the directory that the state file does not list are left alone, except
committed checkpoints of this manager's naming newer than latest (a crash after
the commit point lost only the state update: they are adopted) and uncommitted
leftovers (removed). A clock that goes backwards never causes a deletion.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from orchestrator import rules
from orchestrator.checkpoint import commit, pipeline, reader, state
from orchestrator.checkpoint.commit import PhaseHook
from orchestrator.checkpoint.containment import is_inside, resolve_inside
from orchestrator.checkpoint.errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,
                                            StateUpdateError)
from orchestrator.checkpoint.retention import (Action, BestK, EveryNHours, LatestN, ManagerRetention,
                                               SweepResult, Tracked)
from orchestrator.checkpoint.saver import Saver, VarList, restore_variables, step_value
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.variables import Variable
from orchestrator.errors import InvalidArgumentError

SIDECAR_SUFFIX = ".manager.json"
CORRUPT_MARKER = ".corrupt-"
_TRANSIENT = (PermissionError, ConnectionError, TimeoutError)  # a read that failed, not a corrupt checkpoint
SIDECAR_FORMAT = "orchestrator.manager/1"


@dataclass(frozen=True)
class CheckpointInfo:
    """One row of ``orchestrator ls``."""

    step: int | None
    prefix: str
    timestamp: float | None
    size_bytes: int
    num_shards: int
    reasons: list[str] = field(default_factory=list)
    problem: str | None = None  # why this checkpoint cannot be restored (unreadable index, missing shard)


# ---------------------------------------------------------------------- sidecar
@dataclass
class Sidecar:
    """Manager-only data, keyed by checkpoint basename (parsed with json only)."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # timestamp, metrics, reasons
    preserved: list[str] = field(default_factory=list)
    pending_deletions: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"format": SIDECAR_FORMAT, "checkpoints": self.entries,
                           "preserved": self.preserved, "pending_deletions": self.pending_deletions},
                          indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Sidecar":
        try:
            data = json.loads(text)
            if data.get("format") != SIDECAR_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            names = list(data["preserved"]) + list(data["pending_deletions"])
            if not all(isinstance(name, str) for name in names):
                raise ValueError("checkpoint names must be strings")
            return cls(dict(data["checkpoints"]), list(data["preserved"]), list(data["pending_deletions"]))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # Recursion: nested too deep
            warnings.warn(f"ignoring unreadable checkpoint manager sidecar {where}: {e}", RuntimeWarning,
                          stacklevel=3)
            return cls()


def sidecar_path(directory: str, latest_filename: str = "checkpoint") -> str:
    return Storage.join(directory, latest_filename + SIDECAR_SUFFIX)


def read_sidecar(storage: Storage, directory: str, latest_filename: str = "checkpoint") -> Sidecar:
    path = sidecar_path(directory, latest_filename)
    try:
        return Sidecar.from_json(storage.read_bytes(path).decode("utf-8", "replace"), path)
    except FileNotFoundError:
        return Sidecar()


# ---------------------------------------------------------------------- listing
def list_checkpoints(directory: str, storage_options: Mapping | None = None,
                     latest_filename: str = "checkpoint") -> list[CheckpointInfo]:
    """Every checkpoint index in ``directory`` with why it is kept, and what is wrong with it; changes nothing.

    Raises ``CheckpointNotFoundError`` if the directory (or its bucket) does not exist.
    """
    storage, directory = Storage.for_path(directory, storage_options)
    _require_directory(storage, directory)
    current, _ = commit.read_state(directory, storage_options, latest_filename)
    sidecar = read_sidecar(storage, directory, latest_filename)
    listing = commit.DirectoryListing.of(directory, storage)
    stamps = commit.state_timestamps(current)
    rows = [_info(p, storage, listing, stamps, sidecar, current, storage_options) for p in listing.indexes]
    return sorted(rows, key=lambda r: (r.step is None, r.step or 0, r.prefix))


def _require_directory(storage: Storage, directory: str) -> None:
    if storage.isdir(directory):
        return
    if storage.is_local or storage.exists(directory):
        what = "is not a directory" if storage.exists(directory) else "does not exist"
        raise CheckpointNotFoundError(f"checkpoint directory {directory} {what}")
    bucket = directory.split("://", 1)[0] + "://" + directory.split("://", 1)[1].split("/", 1)[0]
    if not storage.exists(bucket):  # an empty prefix in an existing bucket is just an empty directory
        raise CheckpointNotFoundError(f"checkpoint directory {directory}: bucket {bucket} does not exist")


def _problem(prefix: str, storage: Storage, storage_options: Mapping | None) -> str | None:
    try:
        commit.check_committed(prefix, storage, storage_options)
    except (CheckpointError, OSError) as e:
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


def _info(prefix, storage, listing, stamps, sidecar, current, storage_options=None) -> CheckpointInfo:
    name = Storage.basename(prefix)
    entry = sidecar.entries.get(name, {})
    data = listing.data.get(prefix, [])
    files = [commit.index_path(prefix)] + [path for path, _, _ in data]
    timestamp = stamps.get(prefix, entry.get("timestamp"))
    if timestamp is None:
        timestamp = storage.modified(commit.index_path(prefix))
    return CheckpointInfo(
        step=commit.step_of(prefix), prefix=prefix, timestamp=timestamp,
        size_bytes=sum(_size(storage, f) for f in files),
        num_shards=max((count for _, _, count in data), default=0),
        reasons=_reasons(prefix, name, entry, sidecar, current),
        problem=_problem(prefix, storage, storage_options))


def _reasons(prefix, name, entry, sidecar, current) -> list[str]:
    tracked = current is not None and prefix in (current.all_model_checkpoint_paths or [])
    if tracked:
        return list(entry.get("reasons") or ["tracked"])
    if name in sidecar.preserved:
        return ["every-n-hours"]
    return ["untracked"]


def _size(storage: Storage, path: str) -> int:
    try:
        return storage.size(path)
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------- the manager
class CheckpointManager:
    """Numbered checkpoints ``<directory>/<checkpoint_name>-<step>`` with TF retention.

    NOTE: one process (the coordinator) owns a directory's manager; construction
    cleans up uncommitted leftovers, so do not construct one while a save into the
    directory is in flight.
    """

    def __init__(self, directory: str, max_to_keep: int | None = 5,
                 keep_checkpoint_every_n_hours: float | None = None, checkpoint_name: str = "model.ckpt",
                 best_metric: str | None = None, best_mode: str = "min", keep_best: int | None = None,
                 storage_options: Mapping | None = None, clock: Callable[[], float] = time.time,
                 fsync: bool = True, latest_filename: str = "checkpoint", on_phase: PhaseHook | None = None):
        self.storage_options = dict(storage_options) if storage_options else None
        self._storage, self.directory = Storage.for_path(directory, self.storage_options, fsync)
        self.checkpoint_name = checkpoint_name
        self.latest_filename = latest_filename
        self._retention = _make_retention(max_to_keep, keep_checkpoint_every_n_hours,
                                          best_metric, best_mode, keep_best)
        self._clock = clock
        self._on_phase = on_phase
        self._name_re = re.compile(re.escape(checkpoint_name) + r"-\d+$")
        self._load()

    # -------------------------------------------------------------- public API
    def prefix_for(self, step: int | Variable) -> str:
        return Storage.join(self.directory, f"{self.checkpoint_name}-{step_value(step)}")

    @property
    def latest_checkpoint(self) -> str | None:
        return self._latest

    @property
    def checkpoints(self) -> list[str]:
        """Tracked checkpoints (subject to retention), oldest first, as in TF."""
        return [t.path for t in self._tracked]

    @property
    def preserved_checkpoints(self) -> list[str]:
        """Checkpoints kept forever by ``keep_checkpoint_every_n_hours``, oldest first."""
        return list(self._preserved)

    def save(self, tensors_or_saver: Mapping[str, Any] | Saver, step: int,
             metrics: Mapping[str, float] | None = None, num_shards: int = 1) -> str:
        """Write, commit and apply retention (single process); returns the prefix.

        Raises ``SaveFailedError`` if any shard or the index fails; then nothing is committed
        and the previous latest checkpoint stays latest. ``StateUpdateError`` if the
        checkpoint committed but the sidecar or state file could not be written.
        """
        tensors = tensors_or_saver.tensors() if isinstance(tensors_or_saver, Saver) else dict(tensors_or_saver)
        prefix = self.prefix_for(step)
        self._uncommit_existing(prefix)
        results = pipeline.write_shards(self._storage, prefix, tensors, num_shards)
        self._phase("shards_written")
        return self.commit(step, results, metrics)

    def commit(self, step: int, results: Sequence[Any], metrics: Mapping[str, float] | None = None) -> str:
        """(coordinator) Commit shards written by other processes: index, state, retention.

        NOTE: call only on the coordinator, after every shard's writer reported success.
        Raises ``SaveFailedError`` (nothing committed) or ``StateUpdateError`` (committed,
        bookkeeping failed), as ``save``.
        """
        prefix = self.prefix_for(step)
        commit.commit_index(prefix, results, self._storage)
        self._phase("index_written")
        try:
            self._record(prefix, {k: float(v) for k, v in (metrics or {}).items()})
        except OSError as exc:  # after the commit point: never a raw OSError, never "nothing committed"
            raise StateUpdateError(prefix, exc) from exc
        return prefix

    def restore_or_initialize(self, restore_fn: Saver | VarList | Callable[[str], Any] | None = None) -> str | None:
        """Restore the newest checkpoint that verifies; returns its prefix, or None if there is none.

        A corrupt checkpoint (a CRC mismatch, a truncated or missing file) is skipped with a
        warning and, once an older one verified, renamed aside for inspection: each of its
        files gets ``.corrupt-<UTC time>`` appended, so a later save of the same step cannot
        overwrite the evidence. If checkpoints exist but none verifies, nothing is renamed
        and ``CorruptCheckpointError`` names each one: starting over silently would lose them.
        ``restore_fn``: a Saver, Variables (list/dict), a callable taking the prefix, or
        None (only verify and return the prefix).
        """
        corrupt: list[tuple[str, BaseException]] = []
        for prefix in self._restore_candidates(with_unreadable=True):
            problem = self._verification_problem(prefix)
            if problem is None:
                self._quarantine([p for p, e in corrupt if not isinstance(e, _TRANSIENT)])
                _apply_restore(restore_fn, prefix, self.storage_options)
                return prefix
            corrupt.append((prefix, problem))
        if corrupt:
            listed = "; ".join(f"{p}: {type(e).__name__}: {e}" for p, e in corrupt)
            raise CorruptCheckpointError(
                f"no checkpoint in {self.directory} verifies ({listed}). They are left in place; to start "
                f"over set resume: never, or point resume: at a good checkpoint")
        return None

    def cleanup_uncommitted(self) -> list[str]:
        """Remove leftovers of interrupted saves (data without index, temp files)."""
        return commit.cleanup_uncommitted(self.directory, self._storage, self.storage_options)

    def describe(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.directory, self.storage_options, self.latest_filename)

    # -------------------------------------------------------------- loading
    def _load(self) -> None:
        now = self._clock()
        recovery = commit.recover_state(self.directory, self._storage, self.storage_options,
                                        self.latest_filename, accept=self._is_ours)
        self._sidecar = read_sidecar(self._storage, self.directory, self.latest_filename)
        self._adopt_state(recovery, now)
        self._preserved = [p for p in map(self._path, self._sidecar.preserved) if p is not None]
        self._finish_pending_deletions()
        if recovery.rebuilt:
            self._write_files(self._sidecar, pending=[])
        self.cleanup_uncommitted()

    def _adopt_state(self, recovery: commit.Recovery, now: float) -> None:
        current = recovery.state
        if current is None:
            self._latest, self._tracked, self._last_preserved = None, [], now - 1
            return
        self._latest = current.model_checkpoint_path
        self._last_preserved = float(current.last_preserved_timestamp or 0.0)
        self._tracked = []
        for path in current.all_model_checkpoint_paths or [current.model_checkpoint_path]:
            ts = self._timestamp_of(path, recovery, now)
            if self._still_tracked(path, ts):
                self._tracked.append(Tracked(path, ts, self._entry(path).get("metrics", {})))

    def _still_tracked(self, path: str, ts: float) -> bool:
        """TF: entries not newer than last_preserved count as preserved; ours (in the sidecar)
        stay tracked, since best-k or a clock in doubt may have kept an older one."""
        return ts > self._last_preserved or bool(self._entry(path))

    def _timestamp_of(self, path: str, recovery: commit.Recovery, now: float) -> float:
        """State file, else sidecar, else (adopted after a crash) now; else TF's rule."""
        if path in recovery.timestamps:
            return float(recovery.timestamps[path])
        if "timestamp" in self._entry(path):
            return float(self._entry(path)["timestamp"])
        if path in recovery.adopted:
            return now
        return self._last_preserved  # TF: no timestamp -> counts as preserved

    def _finish_pending_deletions(self) -> None:
        tracked = set(self.checkpoints) | set(self._preserved) | {self._latest}
        for name in self._sidecar.pending_deletions:
            path = self._path(name)
            if path is not None and path not in tracked:
                commit.delete_checkpoint(path, self._storage)
        if self._sidecar.pending_deletions:
            self._sidecar.pending_deletions = []
            self._write_sidecar(self._sidecar)

    # -------------------------------------------------------------- saving
    def _uncommit_existing(self, prefix: str) -> None:
        if self._storage.exists(commit.index_path(prefix)):
            warnings.warn(f"overwriting existing checkpoint {prefix}", RuntimeWarning, stacklevel=3)
            commit.delete_checkpoint(prefix, self._storage)
            self._preserved = [p for p in self._preserved if p != prefix]

    def _record(self, prefix: str, metrics: Mapping[str, float]) -> None:
        now = self._clock()
        tracked = [t for t in self._tracked if t.path != prefix] + [Tracked(prefix, now, dict(metrics))]
        sweep = self._retention.sweep(tracked, self._last_preserved, now)
        kept = [t for t in tracked if _action(sweep, t.path) is Action.KEEP]
        deleted = sweep.paths(Action.DELETE)
        self._preserved = [p for p in self._preserved if p != prefix] + sweep.paths(Action.PRESERVE)
        self._tracked, self._latest, self._last_preserved = kept, prefix, sweep.last_preserved
        self._write_files(self._sidecar_for(kept, sweep, now), pending=deleted)
        self._phase("state_written")
        self._delete(deleted)
        self._phase("done")

    def _sidecar_for(self, kept: list[Tracked], sweep: SweepResult, now: float) -> Sidecar:
        reasons = {d.path: list(d.reasons) for d in sweep.decisions}
        entries = {}
        for t in kept:
            entries[Storage.basename(t.path)] = {"step": commit.step_of(t.path), "timestamp": t.timestamp,
                                                 "metrics": dict(t.metrics), "reasons": reasons[t.path]}
        for path in self._preserved:
            name = Storage.basename(path)
            entries[name] = {**self._sidecar.entries.get(name, {}), "reasons": ["every-n-hours"]}
        return Sidecar(entries, [Storage.basename(p) for p in self._preserved], [])

    def _write_files(self, sidecar: Sidecar, pending: list[str]) -> None:
        """Sidecar (with pending deletions) first, then the state file: see the module docstring."""
        sidecar.pending_deletions = [Storage.basename(p) for p in pending]
        self._write_sidecar(sidecar)
        if self._latest is not None:
            state.update_checkpoint_state(
                self.directory, self._latest,
                all_model_checkpoint_paths=self.checkpoints or [self._latest],
                all_model_checkpoint_timestamps=[t.timestamp for t in self._tracked] or None,
                last_preserved_timestamp=self._last_preserved, latest_filename=self.latest_filename,
                save_relative_paths=True, storage_options=self.storage_options)

    def _write_sidecar(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar
        path = sidecar_path(self.directory, self.latest_filename)
        self._storage.write_bytes(path, sidecar.to_json().encode("utf-8"))

    def _delete(self, paths: list[str]) -> None:
        failed = []
        for path in paths:
            if not is_inside(self.directory, path):  # recover_state keeps only paths inside; never delete elsewhere
                warnings.warn(f"not deleting {path}: outside the checkpoint directory {self.directory}",
                              RuntimeWarning, stacklevel=3)
                continue
            try:
                commit.delete_checkpoint(path, self._storage, on_phase=self._on_phase)
            except OSError as e:
                failed.append(path)
                warnings.warn(f"could not delete expired checkpoint {path}: {e}; will retry at next start",
                              RuntimeWarning, stacklevel=3)
        if paths and not failed:
            self._sidecar.pending_deletions = []
            self._write_sidecar(self._sidecar)

    # -------------------------------------------------------------- restoring
    def _restore_candidates(self, with_unreadable: bool = False) -> list[str]:
        ordered = [self._latest] if self._latest else []
        ordered += [p for p in reversed(self.checkpoints) if p not in ordered]
        ordered += [p for p in reversed(self._preserved) if p not in ordered]
        if with_unreadable:  # newest first, so a newer broken one is skipped (and kept aside) before an older good one
            broken = self._unreadable_indexes(set(ordered))
            newest = commit.step_order(ordered[0]) if ordered else None
            ordered = ([p for p in broken if newest is None or commit.step_order(p) > newest] + ordered
                       + [p for p in broken if newest is not None and commit.step_order(p) <= newest])
        return ordered

    def _unreadable_indexes(self, known: set[str]) -> list[str]:
        """Our checkpoints whose index is on disk but that do not count as committed (an index that is
        not a table, a missing shard), newest first. Loading drops them from the state without a
        trace; restoring must see them, to rename them aside (or refuse to start over) like any
        checkpoint that fails verification, before a re-save of that step overwrites the evidence."""
        listing = commit.DirectoryListing.of(self.directory, self._storage)
        broken = [p for p in listing.indexes if p not in known and self._is_ours(p)
                  and not commit.is_committed(p, self._storage, self.storage_options)]
        return sorted(broken, key=commit.step_order, reverse=True)

    def _verification_problem(self, prefix: str) -> BaseException | None:
        try:
            reader.CheckpointReader(prefix, storage_options=self.storage_options).verify()
            return None
        except (CorruptCheckpointError, CheckpointNotFoundError, OSError) as e:
            warnings.warn(f"checkpoint {prefix} failed verification ({type(e).__name__}: {e}); "
                          f"falling back to the previous kept checkpoint", RuntimeWarning, stacklevel=3)
            return e

    def _quarantine(self, prefixes: list[str]) -> None:
        """Rename each file of corrupt checkpoints to ``<file>.corrupt-<UTC time>``, then forget them."""
        if not prefixes:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        listing = commit.DirectoryListing.of(self.directory, self._storage)
        for prefix in prefixes:
            files = [commit.index_path(prefix)] + [path for path, _, _ in listing.data.get(prefix, [])]
            for path in files:
                if self._storage.exists(path):
                    self._storage.rename(path, f"{path}{CORRUPT_MARKER}{stamp}")
            warnings.warn(f"checkpoint {prefix} is corrupt: its files were renamed to *{CORRUPT_MARKER}{stamp} "
                          f"for inspection", RuntimeWarning, stacklevel=3)
        self._load()  # the state file no longer lists them

    # -------------------------------------------------------------- helpers
    def _phase(self, name: str) -> None:
        if self._on_phase is not None:
            self._on_phase(name)

    def _is_ours(self, prefix: str) -> bool:
        return (Storage.dirname(prefix) == self.directory
                and self._name_re.fullmatch(Storage.basename(prefix)) is not None)

    def _path(self, name: str) -> str | None:
        """A checkpoint named in the sidecar, if it lies inside the directory (else None, warned)."""
        return resolve_inside(self.directory, name, sidecar_path(self.directory, self.latest_filename))

    def _entry(self, path: str) -> dict:
        return self._sidecar.entries.get(Storage.basename(path), {})


def _make_retention(max_to_keep, every_n_hours, best_metric, best_mode, keep_best) -> ManagerRetention:
    """The policies; each checks its own arguments (the rules shared with the job config)."""
    if keep_best is not None and not best_metric:
        raise InvalidArgumentError(f"keep_best: {rules.KEEP_BEST_NEEDS_METRIC}")
    rules.check_best_mode(best_mode)
    best = BestK(best_metric, keep_best, best_mode) if keep_best is not None else None
    hours = EveryNHours(every_n_hours) if every_n_hours is not None else None
    return ManagerRetention(LatestN(max_to_keep), hours, best)


def _action(sweep: SweepResult, path: str) -> Action:
    return next(d.action for d in sweep.decisions if d.path == path)


def _apply_restore(restore_fn, prefix: str, storage_options: Mapping | None) -> None:
    if restore_fn is None:
        return
    if isinstance(restore_fn, Saver):
        restore_fn.restore(prefix)
    elif isinstance(restore_fn, (list, tuple, dict, Variable)):
        restore_variables(Saver(restore_fn, storage_options=storage_options).var_map, prefix, storage_options)
    elif callable(restore_fn):
        restore_fn(prefix)
    else:
        raise InvalidArgumentError(
            f"restore_fn must be a Saver, Variables or a callable, got {type(restore_fn).__name__}")

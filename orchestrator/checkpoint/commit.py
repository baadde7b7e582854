"""The atomic commit protocol shared by ``Saver``, ``CheckpointManager`` and the runtime.

(``pipeline`` plans and writes the shards; this module commits, deletes, cleans up and recovers.)

A checkpoint ``P`` is written in this order; a crash between any two steps leaves
the directory readable, with either the new or the previous checkpoint as latest:

1. (all writers, in parallel) data shards ``P.data-i-of-M``, each written atomically;
2. (coordinator) check every shard is present and whole, then ``P.index``, written
   atomically: **the commit point**. A prefix without an index does not exist;
3. (coordinator) the state file (atomic replace);
4. (coordinator) deletions of expired checkpoints: index first, then data, so a
   crash mid-deletion leaves only uncommitted data, which step 0 removes.

0. On start: ``cleanup_uncommitted`` removes data files with no index and the
   temporary files of interrupted atomic writes; ``recover_state`` rebuilds a
   missing, unparseable or dangling state file from the committed checkpoints.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from orchestrator.checkpoint import bundle, reader, state
from orchestrator.checkpoint.errors import CheckpointError, CheckpointNotFoundError, SaveFailedError
from orchestrator.checkpoint.storage import TEMP_MARKER, Storage

PhaseHook = Callable[[str], None]

_DATA_RE = re.compile(r"^(?P<prefix>.+)\.data-(?P<shard>\d{5,})-of-(?P<count>\d{5,})$")
_TEMP_RE = re.compile(re.escape(TEMP_MARKER) + r"[0-9a-f]{12}$")
_STEP_RE = re.compile(r"-(?P<step>\d+)$")
INDEX_SUFFIX = ".index"


# ---------------------------------------------------------------------- naming
def step_of(prefix: str) -> int | None:
    """The global step a prefix ends with (``model.ckpt-1000`` -> 1000), else None."""
    match = _STEP_RE.search(prefix)
    return int(match.group("step")) if match else None


def index_path(prefix: str) -> str:
    return bundle.index_filename(prefix)


def _split_data_name(path: str) -> tuple[str, int, int] | None:
    match = _DATA_RE.match(path)
    if not match:
        return None
    return match.group("prefix"), int(match.group("shard")), int(match.group("count"))


@dataclass
class DirectoryListing:
    """One listing of a checkpoint directory, grouped the way the protocol needs."""

    indexes: list[str] = field(default_factory=list)  # prefixes with an index
    data: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # prefix -> files
    temps: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, directory: str, storage: Storage) -> "DirectoryListing":
        listing = cls()
        for path in storage.listdir(directory):
            listing._add(path)
        return listing

    def _add(self, path: str) -> None:
        if _TEMP_RE.search(path):
            self.temps.append(path)
        elif path.endswith(INDEX_SUFFIX):
            self.indexes.append(path[: -len(INDEX_SUFFIX)])
        elif (parts := _split_data_name(path)) is not None:
            self.data.setdefault(parts[0], []).append((path, parts[1], parts[2]))


# ---------------------------------------------------------------------- step 1: shards (see ``pipeline``)
def remove_data(results: Sequence["bundle.ShardResult"], storage: Storage) -> None:
    """Best-effort removal of shards that will not be committed."""
    for result in results:
        with contextlib.suppress(Exception):
            storage.rm(result.data_path)


# ---------------------------------------------------------------------- step 2: commit point
def check_shards(prefix: str, results: Sequence["bundle.ShardResult"], storage: Storage) -> None:
    """Every shard reported must be on storage with the size its writer reported."""
    failures: dict[Any, BaseException] = {}
    for result in results:
        try:
            size = storage.size(result.data_path)
        except FileNotFoundError as e:
            failures[result.shard_id] = e
            continue
        if size != result.nbytes:
            failures[result.shard_id] = OSError(
                f"{result.data_path} has {size} bytes, its writer reported {result.nbytes} (short write)")
    if failures:
        raise SaveFailedError(prefix, failures)


def commit_index(prefix: str, results: Sequence["bundle.ShardResult"], storage: Storage) -> None:
    """Write ``prefix.index`` after checking the shards: the commit point.

    On failure the shards are removed (nothing partial stays) and ``SaveFailedError`` raised.
    """
    try:
        check_shards(prefix, results, storage)
        bundle.write_index(prefix, results, storage)
        storage.sync_dir(storage.dirname(prefix))  # the shards' new names must be durable too
    except SaveFailedError:
        remove_data(results, storage)
        raise
    except Exception as e:
        with contextlib.suppress(Exception):  # a PUT reported failed may still have landed
            storage.rm(index_path(prefix))
        remove_data(results, storage)
        raise SaveFailedError(prefix, {"index": e}) from e


# ---------------------------------------------------------------------- step 4: deletions
def delete_checkpoint(prefix: str, storage: Storage, include_meta: bool = False,
                      on_phase: PhaseHook | None = None) -> None:
    """Delete a checkpoint: its index first (uncommitting it), then its data files."""
    storage.rm(index_path(prefix))
    if on_phase:
        on_phase("deleting")
    directory = storage.dirname(prefix)
    for path, _, _ in DirectoryListing.of(directory, storage).data.get(prefix, []):
        storage.rm(path)
    if include_meta:
        storage.rm(meta_path(prefix))


def meta_path(prefix: str) -> str:
    """TF1's ``.meta`` name: a trailing ``-NNNNN-of-NNNNN`` is stripped first."""
    return re.sub(r"-\d+-of-\d+$", "", prefix) + ".meta"


# ---------------------------------------------------------------------- step 0: cleanup
def uncommitted_files(directory: str, storage: Storage, storage_options: Mapping | None = None) -> list[str]:
    """Data files whose checkpoint has no index, and leftover temporary files."""
    listing = DirectoryListing.of(directory, storage)
    committed = set(listing.indexes)
    doomed = list(listing.temps)
    for prefix, files in listing.data.items():
        if prefix not in committed:
            doomed.extend(path for path, _, _ in files)
        else:
            doomed.extend(_stray_shard_counts(prefix, files, storage_options))
    return sorted(doomed)


def _stray_shard_counts(prefix: str, files: list[tuple[str, int, int]],
                        storage_options: Mapping | None) -> list[str]:
    """Data files of a committed prefix written with a different shard count."""
    counts = {count for _, _, count in files}
    if len(counts) <= 1:
        return []
    try:
        num_shards = reader.CheckpointReader(prefix, storage_options=storage_options).num_shards
    except Exception:
        return []  # in doubt: keep
    return [path for path, _, count in files if count != num_shards]


def cleanup_uncommitted(directory: str, storage: Storage, storage_options: Mapping | None = None) -> list[str]:
    """Remove leftovers of interrupted saves; returns what was removed.

    NOTE: call only while no save into ``directory`` is in flight (at start), or
    the shards of that save would be removed.
    """
    removed = []
    for path in uncommitted_files(directory, storage, storage_options):
        try:
            storage.rm(path)
        except FileNotFoundError:
            continue
        except IsADirectoryError:  # a directory with a data file's name: not ours to remove
            warnings.warn(f"{path} is a directory, not a checkpoint data file; left alone", RuntimeWarning,
                          stacklevel=2)
            continue
        removed.append(path)
    return removed


# ---------------------------------------------------------------------- recovery
def check_committed(prefix: str, storage: Storage, storage_options: Mapping | None = None) -> None:
    """Raise a ``CheckpointError`` unless the index parses and every data shard exists."""
    ckpt = reader.CheckpointReader(prefix, storage_options=storage_options)
    for shard_id in range(ckpt.num_shards):  # stops at the first gap: the count is the index's word, forged or not
        path = bundle.data_filename(ckpt.prefix, shard_id, ckpt.num_shards)
        if not storage.exists(path):
            raise CheckpointNotFoundError(f"{prefix}: data shard(s) missing: {path} (the index names "
                                          f"{ckpt.num_shards} shards)")


def is_committed(prefix: str, storage: Storage, storage_options: Mapping | None = None) -> bool:
    try:
        check_committed(prefix, storage, storage_options)
    except (CheckpointError, OSError):
        return False
    return True


def committed_checkpoints(directory: str, storage: Storage, storage_options: Mapping | None = None,
                          accept: Callable[[str], bool] = lambda p: True) -> list[str]:
    """Committed checkpoints on disk, ordered by step (then name)."""
    listing = DirectoryListing.of(directory, storage)
    found = [p for p in listing.indexes if accept(p) and is_committed(p, storage, storage_options)]
    return sorted(found, key=step_order)


def step_order(prefix: str) -> tuple[int, str]:
    step = step_of(prefix)
    return (-1 if step is None else step, prefix)


@dataclass(frozen=True)
class Recovery:
    """The state to use, and whether it differs from the state file on storage.

    ``timestamps`` are the save times the state file recorded; ``adopted`` are the
    committed checkpoints added because the state file missed them.
    """

    state: "state.CheckpointState | None"
    rebuilt: bool
    skipped: tuple[str, ...] = ()
    adopted: tuple[str, ...] = ()
    timestamps: Mapping[str, float] = field(default_factory=dict)


def state_timestamps(current) -> dict[str, float]:
    """``{path: timestamp}`` from a state; empty where the state has no timestamps."""
    if current is None:
        return {}
    paths = list(current.all_model_checkpoint_paths or [])
    stamps = list(current.all_model_checkpoint_timestamps or [])
    return dict(zip(paths, stamps)) if len(paths) == len(stamps) else {}


def read_state(directory: str, storage_options: Mapping | None, latest_filename: str):
    """``(state or None, problem or None)``: an unparseable state file is a problem, not an error."""
    try:
        return state.get_checkpoint_state(directory, latest_filename=latest_filename,
                                          storage_options=storage_options), None
    except CheckpointError as e:
        return None, f"state file {latest_filename!r} in {directory} is unreadable ({e})"


def recover_state(directory: str, storage: Storage, storage_options: Mapping | None = None,
                  latest_filename: str = "checkpoint",
                  accept: Callable[[str], bool] = lambda p: True) -> Recovery:
    """The checkpoint state of ``directory``, repaired from what is committed on disk.

    * missing or unparseable state file: rebuilt from every committed checkpoint that
      ``accept`` (the naming filter) accepts, ordered by step, without timestamps;
    * tracked checkpoints whose index is missing or corrupt are dropped, and latest
      falls back to the newest remaining one;
    * committed checkpoints newer (by step) than latest and accepted by ``accept``
      are adopted: their index was written (the commit point), only the state update
      was lost to a crash.
    Each repair is reported with ``warnings.warn`` naming what was skipped.
    """
    current, problem = read_state(directory, storage_options, latest_filename)
    if current is None:
        return _rebuild_from_disk(directory, storage, storage_options, accept, problem)
    paths = _state_paths(current)
    good = [p for p in paths if is_committed(p, storage, storage_options)]
    skipped = tuple(p for p in paths if p not in good)
    newer = _newer_committed(directory, storage, storage_options, accept, good, paths)
    stamps = state_timestamps(current)
    if not skipped and not newer:
        return Recovery(current, rebuilt=False, timestamps=stamps)
    for path in skipped:
        warnings.warn(f"checkpoint state in {directory}: skipping {path} (index missing or corrupt)",
                      RuntimeWarning, stacklevel=2)
    for path in newer:
        warnings.warn(f"checkpoint state in {directory}: adopting committed {path} missing from the state file",
                      RuntimeWarning, stacklevel=2)
    if not good and not newer:
        return _rebuild_from_disk(directory, storage, storage_options, accept, None, skipped)
    return Recovery(_with_paths(current, good + newer, stamps), rebuilt=True, skipped=skipped,
                    adopted=tuple(newer), timestamps=stamps)


def _state_paths(current) -> list[str]:
    paths = list(current.all_model_checkpoint_paths or [])
    latest = current.model_checkpoint_path
    if latest and latest not in paths:
        paths.append(latest)
    return paths


def _newer_committed(directory, storage, storage_options, accept, good, tracked) -> list[str]:
    latest_step = max((step_of(p) for p in good if step_of(p) is not None), default=-1)
    listing = DirectoryListing.of(directory, storage)
    candidates = [p for p in listing.indexes
                  if p not in tracked and accept(p) and (step_of(p) or -1) > latest_step]
    return sorted((p for p in candidates if is_committed(p, storage, storage_options)), key=step_order)


def _with_paths(current, paths: list[str], stamps: Mapping[str, float]):
    timestamps = [stamps[p] for p in paths] if all(p in stamps for p in paths) else []
    return state.CheckpointState(
        model_checkpoint_path=paths[-1],
        all_model_checkpoint_paths=paths,
        all_model_checkpoint_timestamps=timestamps,
        last_preserved_timestamp=current.last_preserved_timestamp,
    )


def _rebuild_from_disk(directory, storage, storage_options, accept, problem, skipped=()) -> Recovery:
    found = committed_checkpoints(directory, storage, storage_options, accept)
    if problem:
        warnings.warn(f"{problem}; rebuilding it from {len(found)} committed checkpoint(s) on disk",
                      RuntimeWarning, stacklevel=3)
    if not found:
        return Recovery(None, rebuilt=False, skipped=tuple(skipped))
    if not problem and not skipped:
        warnings.warn(f"no checkpoint state in {directory}; recovered {len(found)} committed checkpoint(s)",
                      RuntimeWarning, stacklevel=3)
    rebuilt = state.CheckpointState(
        model_checkpoint_path=found[-1],
        all_model_checkpoint_paths=found,
        all_model_checkpoint_timestamps=[],
        last_preserved_timestamp=0.0,
    )
    return Recovery(rebuilt, rebuilt=True, skipped=tuple(skipped))

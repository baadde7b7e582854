"""The ``checkpoint`` state file: which checkpoint is the latest, and which are kept.

A text-format ``CheckpointState`` proto (reference section 7), readable by TF's
``tf.train.get_checkpoint_state``. Paths are stored relative to the directory (unless
asked otherwise) so a checkpoint directory can be moved or copied to another store;
reading joins relative paths back onto the directory. Writes replace the file atomically.

Reading keeps only the paths that lie inside the directory (``containment``): a state file
naming ``/other/dir/model.ckpt-1``, ``../x`` or an ``http://`` URL cannot make us read,
fetch or delete anything elsewhere; such entries are dropped with a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from google.protobuf import text_format

from orchestrator.checkpoint import bundle
from orchestrator.checkpoint.containment import resolve_inside
from orchestrator.checkpoint.errors import CorruptCheckpointError, InvalidCheckpointWriteError
from orchestrator.checkpoint.protos import CheckpointState as CheckpointStateProto
from orchestrator.checkpoint.storage import Storage

DEFAULT_FILENAME = "checkpoint"


@dataclass
class CheckpointState:
    """The parsed state file; paths are absolute (joined onto the directory)."""

    model_checkpoint_path: str
    all_model_checkpoint_paths: list[str] = field(default_factory=list)
    all_model_checkpoint_timestamps: list[float] = field(default_factory=list)
    last_preserved_timestamp: float = 0.0


def _absolute(path: str, directory: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    joined = Storage.join(directory, path)
    return joined if "://" in joined else os.path.normpath(joined)


def _as_written(path: str, directory: str, given_dir: str, relative: bool) -> str:
    """How ``path`` goes into the state file of ``directory`` (TF's rules).

    As in TF's ``generate_checkpoint_state_proto``: when the directory was given as a
    relative local path, relative checkpoint paths are relative to the working directory
    too and are rewritten relative to the directory; otherwise a relative path is kept
    (it is read back relative to the directory). With ``relative``, absolute paths
    inside the directory are written relative to it.
    """
    if "://" in directory:
        head = directory.rstrip("/") + "/"
        return path[len(head):] if relative and path.startswith(head) else path
    if "://" in path and not path.startswith("file://"):
        return path
    local = path.split("://", 1)[1] if path.startswith("file://") else path
    if not os.path.isabs(local):
        dir_is_relative = "://" not in given_dir and not os.path.isabs(given_dir)
        return os.path.relpath(local, given_dir) if dir_is_relative else local
    return os.path.relpath(local, directory) if relative else local


# ---------------------------------------------------------------------------- reading
def get_checkpoint_state(directory: str, latest_filename: str = DEFAULT_FILENAME,
                         storage_options: Mapping[str, Any] | None = None) -> CheckpointState | None:
    """The directory's state, or ``None`` if it has no state file."""
    storage, directory = Storage.for_path(directory, storage_options)
    path = Storage.join(directory, latest_filename)
    try:
        text = storage.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):  # no such directory, or a file: no state (as TF)
        return None
    return _contained_state(_parse(text, path), directory, path)


def _contained_state(proto: CheckpointStateProto, directory: str, path: str) -> CheckpointState | None:
    """The state with every path outside ``directory`` dropped (warned); None if nothing is left.

    If the latest checkpoint is dropped, the newest remaining kept one becomes latest.
    """
    stamps = list(proto.all_model_checkpoint_timestamps)
    aligned = len(stamps) == len(proto.all_model_checkpoint_paths)
    paths, kept_stamps = [], []
    for i, entry in enumerate(proto.all_model_checkpoint_paths):
        inside = resolve_inside(directory, entry, path)
        if inside is not None:
            paths.append(inside)
            kept_stamps += [stamps[i]] if aligned else []
    latest = resolve_inside(directory, proto.model_checkpoint_path, path)
    if latest is None and not paths:
        return None
    return CheckpointState(
        model_checkpoint_path=latest if latest is not None else paths[-1],
        all_model_checkpoint_paths=paths,
        all_model_checkpoint_timestamps=kept_stamps if aligned else stamps,
        last_preserved_timestamp=proto.last_preserved_timestamp,
    )


def _parse(data: bytes, path: str) -> CheckpointStateProto:
    proto = CheckpointStateProto()
    try:
        text_format.Merge(data.decode("utf-8"), proto)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: unparseable checkpoint state file: {exc}") from None
    if not proto.model_checkpoint_path:
        raise CorruptCheckpointError(f"{path}: checkpoint state file has an empty model_checkpoint_path")
    return proto


def latest_checkpoint(directory: str, latest_filename: str = DEFAULT_FILENAME,
                      storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The latest checkpoint's prefix, if the state file names one whose index exists."""
    state = get_checkpoint_state(directory, latest_filename, storage_options)
    if state is None:
        return None
    storage, prefix = Storage.for_path(state.model_checkpoint_path, storage_options)
    if storage.exists(bundle.index_filename(prefix)):
        return state.model_checkpoint_path
    return None


# ---------------------------------------------------------------------------- writing
def update_checkpoint_state(
    directory: str,
    model_checkpoint_path: str,
    all_model_checkpoint_paths: Sequence[str] | None = None,
    all_model_checkpoint_timestamps: Sequence[float] | None = None,
    last_preserved_timestamp: float | None = None,
    latest_filename: str = DEFAULT_FILENAME,
    save_relative_paths: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Atomically replace the state file (TF's ``update_checkpoint_state`` semantics).

    ``model_checkpoint_path`` is appended to ``all_model_checkpoint_paths`` unless it is
    already last; timestamps, if given, must match the paths one to one. Paths are
    written as ``_as_written`` describes.
    """
    given_dir = os.fspath(directory)
    storage, directory = Storage.for_path(given_dir, storage_options)
    path = Storage.join(directory, latest_filename)
    paths = list(all_model_checkpoint_paths or [])
    if not paths or paths[-1] != model_checkpoint_path:
        paths.append(model_checkpoint_path)
    stamps = list(all_model_checkpoint_timestamps or [])
    if stamps and len(stamps) != len(paths):
        raise InvalidCheckpointWriteError(
            f"{path}: {len(stamps)} timestamps for {len(paths)} checkpoint paths")
    model_checkpoint_path = _as_written(model_checkpoint_path, directory, given_dir, save_relative_paths)
    paths = [_as_written(p, directory, given_dir, save_relative_paths) for p in paths]
    if _absolute(model_checkpoint_path, directory) == path:
        raise InvalidCheckpointWriteError(f"save path {model_checkpoint_path!r} conflicts with the state file {path}")
    proto = CheckpointStateProto(model_checkpoint_path=model_checkpoint_path, all_model_checkpoint_paths=paths,
                                 all_model_checkpoint_timestamps=stamps)
    if last_preserved_timestamp is not None:
        proto.last_preserved_timestamp = last_preserved_timestamp
    storage.write_bytes(path, text_format.MessageToString(proto).encode("utf-8"))

"""``Saver``: TF1 ``tf.train.Saver`` semantics for our ``Variable``s.

* ``var_list`` is a list (each variable saved under its own name) or a dict
  (saved under the key: renames both ways, e.g. the v1/v2 swap). ``None`` is an
  error: there is no global variable registry here, so, like TF's eager Saver,
  the variables must be given explicitly (``model.variables + optimizer slots``).
* ``save(save_path, global_step)`` writes ``save_path-<step>`` through the commit
  protocol (shards -> index -> state file -> at most one deletion, reference 7.3).
* ``restore(prefix)`` checks every variable against the checkpoint and reads every
  value *before* assigning any, so a failed restore changes nothing.
* ``structure=model`` also saves the model structure record (what TF kept in
  ``.meta``), so ``load_model`` and ``export`` work on the checkpoint.
"""

from __future__ import annotations

import difflib
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint import commit, pipeline, reader, state, structure as structure_lib
from orchestrator.checkpoint.errors import CheckpointError, StateUpdateError
from orchestrator.checkpoint.retention import Action, SaverRetention, Tracked
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.variables import Variable
from orchestrator.errors import BadInputError, InvalidArgumentError

VarList = Sequence[Variable] | Mapping[str, Variable]


class RestoreMismatchError(CheckpointError, BadInputError, ValueError):
    """Variables do not match the checkpoint (missing keys, shapes or dtypes); nothing was assigned."""


def normalize_var_list(var_list: VarList | None) -> dict[str, Variable]:
    """``{checkpoint key: Variable}`` for a list or dict ``var_list``."""
    if var_list is None:
        raise InvalidArgumentError(
            "Saver needs var_list: a list of Variables (saved under their names), e.g. "
            "Saver(model.variables), or a dict {checkpoint key: Variable}, e.g. "
            "Saver({'dense/kernel': kernel}); there is no global variable collection to default to")
    if isinstance(var_list, Mapping):
        pairs = [(str(k), v) for k, v in var_list.items()]
    elif isinstance(var_list, Variable):
        pairs = [(var_list.name, var_list)]
    else:
        pairs = [(getattr(v, "name", None), v) for v in var_list]
    return _checked_pairs(pairs)


def _checked_pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Variable]:
    result: dict[str, Variable] = {}
    for key, var in pairs:
        if not isinstance(var, Variable):
            raise InvalidArgumentError(f"var_list entry {key!r} is a {type(var).__name__}, expected a Variable")
        if key in result:
            raise InvalidArgumentError(f"var_list has two variables saved under the same key {key!r}")
        result[key] = var
    return result


def step_value(global_step: int | Variable | Any) -> int:
    """An int from an int, a 0-d array or a ``Variable`` holding the step."""
    if isinstance(global_step, Variable):
        global_step = global_step.numpy()
    return int(np.asarray(global_step).reshape(()))


def checkpoint_prefix(save_path: str, global_step: int | Variable | None) -> str:
    """``save_path-<step>`` with a step (TF1 ``"%s-%d"``), else ``save_path``."""
    if global_step is None:
        return save_path
    return f"{save_path}-{step_value(global_step)}"


# ---------------------------------------------------------------------- restore checks
def mismatches(var_map: Mapping[str, Variable], ckpt: "reader.CheckpointReader") -> list[str]:
    """One line per variable that cannot be restored from ``ckpt``."""
    shapes = ckpt.get_variable_to_shape_map()
    problems = []
    for key, var in var_map.items():
        if key not in shapes:
            problems.append(_missing_line(key, var, shapes))
        elif tuple(shapes[key]) != tuple(var.shape):
            problems.append(f"shape mismatch: {key!r}: checkpoint {tuple(shapes[key])} vs variable "
                            f"{var.name!r} {tuple(var.shape)}")
        elif ckpt.dtype(key) != np.dtype(var.dtype) and not _both_strings(ckpt.dtype(key), var.dtype):
            problems.append(f"dtype mismatch: {key!r}: checkpoint {ckpt.dtype(key)} vs variable "
                            f"{var.name!r} {np.dtype(var.dtype)}")
    return problems


def _both_strings(stored: np.dtype, wanted: np.dtype) -> bool:
    """A DT_STRING tensor (read as ``object``) restores into a numpy object, str or bytes variable."""
    return stored == np.dtype(object) and np.dtype(wanted).kind in "OSU"


def _missing_line(key: str, var: Variable, shapes: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(shapes), n=3, cutoff=0.6)
    hint = ", ".join(f"{c!r} {tuple(shapes[c])}" for c in close) or "none"
    return f"missing in checkpoint: {key!r} (variable {var.name!r} {tuple(var.shape)}); close matches: {hint}"


def restore_variables(var_map: Mapping[str, Variable], prefix: str,
                      storage_options: Mapping | None = None) -> None:
    """Validate all, read all (every CRC checked), then assign all."""
    ckpt = reader.CheckpointReader(prefix, storage_options=storage_options)
    problems = mismatches(var_map, ckpt)
    if problems:
        raise RestoreMismatchError(
            f"cannot restore from {prefix}: {len(problems)} variable(s) do not match, none was assigned:\n  "
            + "\n  ".join(problems))
    values = ckpt.get_tensors(var_map)
    for key, var in var_map.items():
        var.assign(values[key])


# ---------------------------------------------------------------------- the Saver
class Saver:
    """Saves and restores a fixed set of variables (TF1 ``tf.train.Saver``)."""

    def __init__(self, var_list: VarList | None = None, max_to_keep: int | None = 5,
                 keep_checkpoint_every_n_hours: float = 10000.0, save_relative_paths: bool = True,
                 num_shards: int = 1, storage_options: Mapping | None = None,
                 clock: Callable[[], float] = time.time, latest_filename: str = "checkpoint",
                 fsync: bool = True, structure: Any = None):
        """``structure``: a model (or ``{"spec", "variables"}`` mapping) whose structure record
        every save also writes; its variables must be among those saved."""
        self.var_map = normalize_var_list(var_list)
        self.structure = None if structure is None else self._checked_structure(structure)
        if num_shards < 1:
            raise InvalidArgumentError(f"num_shards must be >= 1, got {num_shards}")
        self.num_shards = num_shards
        self.save_relative_paths = save_relative_paths
        self.storage_options = dict(storage_options) if storage_options else None
        self.latest_filename = latest_filename
        self.fsync = fsync
        self._clock = clock
        self._retention = SaverRetention.starting_at(clock(), max_to_keep, keep_checkpoint_every_n_hours)

    def _checked_structure(self, structure: Any) -> dict:
        record = structure_lib.record_for(structure)
        missing = [name for name in record["variables"] if name not in self.var_map]
        if missing:
            raise InvalidArgumentError(f"structure lists variables the Saver does not save: {missing}; "
                             f"saved keys: {sorted(self.var_map)}")
        if structure_lib.STRUCTURE_KEY in self.var_map:
            raise InvalidArgumentError(f"var_list uses the reserved key {structure_lib.STRUCTURE_KEY!r}")
        return record

    # -------------------------------------------------------------- save
    def tensors(self) -> dict[str, np.ndarray]:
        """Host copies of the values to save, by checkpoint key (plus the structure record)."""
        values = {key: var.numpy() for key, var in self.var_map.items()}
        if self.structure is not None:
            values.update(structure_lib.record_tensors(self.structure))
        return values

    def save(self, save_path: str, global_step: int | Variable | None = None,
             write_state: bool = True) -> str:
        """Write a checkpoint; returns its prefix.

        Raises ``SaveFailedError`` if any shard or the index failed (nothing committed), or
        ``StateUpdateError`` if the checkpoint committed but the state file update or an
        expired checkpoint's deletion failed.
        """
        pipeline.check_prefix(save_path)
        storage, path = Storage.for_path(save_path, self.storage_options, self.fsync)
        prefix = checkpoint_prefix(path, global_step)
        pipeline.save(storage, prefix, self.tensors(), self.num_shards)
        if write_state:
            try:
                self._update_state(prefix, storage)
            except OSError as exc:  # after the commit point: the checkpoint exists, its bookkeeping failed
                raise StateUpdateError(prefix, exc) from exc
        return prefix

    def _update_state(self, prefix: str, storage: Storage) -> None:
        now = self._clock()
        self._retention.record(prefix, now)
        state.update_checkpoint_state(
            storage.dirname(prefix), prefix,
            all_model_checkpoint_paths=self._retention.state_paths(prefix),
            latest_filename=self.latest_filename, save_relative_paths=self.save_relative_paths,
            storage_options=self.storage_options)
        decision = self._retention.next_deletion(now)
        if decision is not None and decision.action is Action.DELETE:
            commit.delete_checkpoint(decision.path, storage, include_meta=True)

    # -------------------------------------------------------------- restore
    def restore(self, prefix: str) -> None:
        """Assign every variable from ``prefix``; on any mismatch raise and assign nothing."""
        restore_variables(self.var_map, prefix, self.storage_options)

    # -------------------------------------------------------------- bookkeeping (TF1 API)
    @property
    def last_checkpoints(self) -> list[str]:
        """Tracked checkpoints, oldest first (not yet expired)."""
        return [t.path for t in self._retention.last_checkpoints]

    def recover_last_checkpoints(self, checkpoint_paths: Sequence[str]) -> None:
        """Track checkpoints of an earlier process again, with their index mtimes as timestamps."""
        now = self._clock()
        tracked = []
        for path in checkpoint_paths:
            storage, full = Storage.for_path(path, self.storage_options)
            if storage.exists(commit.index_path(full)):
                stamp = storage.modified(commit.index_path(full))
                tracked.append(Tracked(full, min(stamp, now) if stamp is not None else now))
        self._retention.last_checkpoints = tracked

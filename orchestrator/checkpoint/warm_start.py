"""Warm start: which of a model's variables take their values from another checkpoint.

What TF1 did with ``Saver(var_list={ckpt_name: variable})`` + ``restore`` before training, or
``tf.train.init_from_checkpoint`` / ``tf.estimator.WarmStartSettings``, for a job: the job's
``init_from: {checkpoint, variables, rename}``. The checkpoint may be ours, one TensorFlow wrote
(TF1 ``Saver``, TF2 ``tf.train.Checkpoint``/Keras) or an exported ``.safetensors`` file; it needs no
structure record, and only the model's variables (never optimizer slots, step or data position)
are taken: the job starts at step 0 with fresh optimizer state.

Rules, checked before anything is read or assigned (a ``WarmStartError`` names the config key):

* ``variables``: globs (``fnmatch``) over the *model's* variable names; the variables they select
  are taken, the others start as initialised. A glob must select at least one model variable; a
  glob with wildcards must take at least one tensor from the checkpoint; a plain name must be in it.
* ``rename``: ``{checkpoint name: model name}``. A renamed checkpoint tensor is used only under its
  new name; a model variable not renamed to takes the tensor of its own name.
* a selected variable whose tensor the checkpoint lacks starts fresh (a bigger model warm-started
  from a smaller one); one whose tensor has another shape or dtype is an error naming both: leave it
  out of ``variables`` to start it fresh.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint.errors import CheckpointError
from orchestrator.errors import BadInputError, KeyedError

_WILDCARDS = set("*?[")


class WarmStartError(CheckpointError, KeyedError, BadInputError, ValueError):
    """``init_from`` cannot be applied to this model; ``key`` is the config key at fault."""


@dataclass(frozen=True)
class WarmStartPlan:
    """What a warm start does: ``taken`` {model name: checkpoint name}, ``fresh`` {model name: why}."""

    checkpoint: str
    taken: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One log line per model variable, taken or left fresh."""
        out = [f"init_from {self.checkpoint}: took {name} <- {source} {self.shapes[name]}"
               for name, source in sorted(self.taken.items())]
        out += [f"init_from {self.checkpoint}: left fresh {name} ({why})" for name, why in sorted(self.fresh.items())]
        return out

    def summary(self) -> str:
        return (f"init_from {self.checkpoint}: {len(self.taken)} variable(s) taken, "
                f"{len(self.fresh)} initialised fresh; training starts at step 0")


def open_source(path: str, storage_options: Mapping[str, Any] | None = None):
    """A reader of ``init_from.checkpoint``: a prefix, a directory (its latest) or a .safetensors file."""
    from orchestrator.checkpoint.safetensors_file import open_tensors

    try:
        return open_tensors(path, storage_options)
    except (CheckpointError, OSError) as exc:
        raise WarmStartError(f"cannot read {path}: {exc}", "init_from.checkpoint") from None


def plan(reader, model_vars: Mapping[str, tuple[Sequence[int], Any]], variables: Sequence[str] = ("*",),
         rename: Mapping[str, str] | None = None) -> WarmStartPlan:
    """The plan for a model whose variables are ``{name: (shape, dtype)}`` (see the module rules)."""
    rename = dict(rename or {})
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    source_of = _sources(rename, shapes, model_vars)
    selected = _selected(variables, model_vars)
    taken, fresh = {}, {}
    for name in model_vars:
        source = source_of(name)
        if name not in selected:
            fresh[name] = "not selected by init_from.variables"
        elif source is None:
            fresh[name] = f"{name!r} is not in the checkpoint"
        else:
            _check_match(name, source, model_vars[name], shapes[source], dtypes[source], rename)
            taken[name] = source
    _check_globs(variables, selected, taken)
    return WarmStartPlan(reader.prefix, taken, fresh, {n: list(model_vars[n][0]) for n in taken})


def _sources(rename: Mapping[str, str], shapes: Mapping[str, Any], model_vars: Mapping[str, Any]):
    """``source_of(model name) -> checkpoint name or None``, after checking every rename entry."""
    by_target: dict[str, str] = {}
    for source, target in rename.items():
        key = f"init_from.rename.{source}"
        if source not in shapes:
            raise WarmStartError(f"{source!r} is not in the checkpoint{_close(source, shapes)}", key)
        if target not in model_vars:
            raise WarmStartError(f"renames to {target!r}, which is not a model variable{_close(target, model_vars)}",
                                 key)
        if target in by_target:
            raise WarmStartError(f"{by_target[target]!r} and {source!r} both rename to {target!r}", key)
        by_target[target] = source

    def source_of(name: str) -> str | None:
        if name in by_target:
            return by_target[name]
        return name if name in shapes and name not in rename else None

    return source_of


def _selected(variables: Sequence[str], model_vars: Mapping[str, Any]) -> dict[str, list[int]]:
    """{model name: indices of the globs selecting it}; a glob selecting nothing is an error."""
    selected: dict[str, list[int]] = {}
    for i, glob in enumerate(variables):
        hits = fnmatch.filter(model_vars, glob)
        if not hits:
            raise WarmStartError(f"{glob!r} matches no model variable; the model's variables: "
                                 f"{', '.join(sorted(model_vars))}", f"init_from.variables[{i}]")
        for name in hits:
            selected.setdefault(name, []).append(i)
    return selected


def _check_globs(variables: Sequence[str], selected: Mapping[str, list[int]], taken: Mapping[str, str]) -> None:
    for i, glob in enumerate(variables):
        names = [n for n, globs in selected.items() if i in globs]
        if not any(n in taken for n in names):
            what = "is" if not _WILDCARDS & set(glob) else "selects model variables that are"
            raise WarmStartError(f"{glob!r} {what} not in the checkpoint ({', '.join(sorted(names))}); give "
                                 f"init_from.rename {{checkpoint name: model name}} if it is saved under "
                                 f"another name", f"init_from.variables[{i}]")


def _check_match(name: str, source: str, ours: tuple[Sequence[int], Any], shape: Sequence[int], dtype: Any,
                 rename: Mapping[str, str]) -> None:
    our_shape, our_dtype = tuple(ours[0]), np.dtype(ours[1])
    if tuple(shape) == our_shape and np.dtype(dtype) == our_dtype:
        return
    key = f"init_from.rename.{source}" if source in rename else "init_from.variables"
    raise WarmStartError(f"checkpoint tensor {source!r} is {np.dtype(dtype)}{list(shape)} but model variable "
                         f"{name!r} is {our_dtype}{list(our_shape)}; leave it out of init_from.variables "
                         f"to start it fresh", key)


def _close(name: str, known: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""

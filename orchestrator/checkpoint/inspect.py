"""What ``orchestrator inspect PATH`` shows (TF's ``inspect_checkpoint``), as functions.

``describe`` lists the tensors without reading any tensor data; ``format_table`` and
``to_json`` render that list for people and for scripts; ``format_tensor`` prints a value.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.checkpoint.safetensors_file import open_tensors
from orchestrator.units import human_bytes


@dataclass(frozen=True)
class TensorInfo:
    """One row: a tensor's name, dtype, shape, stored size and the shard(s) holding it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    shards: tuple[int, ...]
    partitioned: bool = False

    @property
    def shard(self) -> str:
        return ",".join(str(s) for s in self.shards)


def describe(path: str, storage_options: Mapping[str, Any] | None = None) -> list[TensorInfo]:
    """Rows for a checkpoint prefix or directory (its latest checkpoint), or a ``.safetensors``
    file, sorted by name."""
    return describe_reader(open_tensors(path, storage_options))


def describe_reader(reader: CheckpointReader) -> list[TensorInfo]:
    return [_info(reader, name) for name in reader.keys()]


def _info(reader: CheckpointReader, name: str) -> TensorInfo:
    entry = reader.entry(name)
    return TensorInfo(name, entry.dtype_name, entry.shape, reader.stored_nbytes(name), reader.shard_ids(name),
                      bool(entry.slices))


def format_table(rows: Sequence[TensorInfo]) -> str:
    """An aligned text table with a total line."""
    header = ("name", "dtype", "shape", "size", "shard")
    body = [(r.name, r.dtype, str(list(r.shape)), human_bytes(r.nbytes), r.shard) for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    total = sum(r.nbytes for r in rows)
    lines.append(f"{len(rows)} tensors, {human_bytes(total)} ({total} bytes)")
    return "\n".join(lines)


def to_json(rows: Sequence[TensorInfo]) -> str:
    """``{"tensors": [...], "num_tensors": n, "total_bytes": b}`` for scripts."""
    tensors = [{**asdict(r), "shape": list(r.shape), "shards": list(r.shards)} for r in rows]
    doc = {"tensors": tensors, "num_tensors": len(rows), "total_bytes": sum(r.nbytes for r in rows)}
    return json.dumps(doc, indent=2)


def format_tensor(name: str, array: np.ndarray, full: bool = False, dtype: str | None = None) -> str:
    """``name (dtype, shape):`` then the value; ``full`` prints every element.

    ``dtype`` is the name the table shows (``string``, not numpy's ``object``); by
    default it is derived from the array.
    """
    threshold = sys.maxsize if full else 1000
    value = np.array2string(np.asarray(array), threshold=threshold, separator=", ")
    return f"{name} ({dtype or _dtype_name(array)}, {list(array.shape)}):\n{value}"


def _dtype_name(array: np.ndarray) -> str:
    return "string" if np.asarray(array).dtype == object else str(array.dtype)


def format_values(reader: CheckpointReader, names: Sequence[str]) -> str:
    """The named tensors' values, blank-line separated.

    Every name is checked first (an unknown one raises ``CheckpointNotFoundError``
    with close matches), so a typo prints nothing. Tensors are read one at a time.
    """
    entries = [reader.entry(name) for name in names]
    return "\n\n".join(format_tensor(e.name, reader.get_tensor(e.name), dtype=e.dtype_name) for e in entries)

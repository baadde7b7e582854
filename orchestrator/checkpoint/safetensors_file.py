"""The single-file export format, ``.safetensors``, both ways.

Layout (written and parsed here by hand, no pickle, no code): an 8-byte little-endian
header length, a JSON header (``{name: {dtype, shape, data_offsets}}`` plus
``__metadata__``, padded with spaces to a multiple of 8 bytes), then the raw
little-endian tensor bytes.

``SafetensorsReader`` reads such a file the way ``CheckpointReader`` reads a
checkpoint (``keys``, ``get_tensor``, ``get_tensors``, ``entry``), and presents the
structure record our export stores in the metadata as the ``_MODEL_STRUCTURE``
tensor it came from, so ``load_model``, ``inspect`` and ``init_from`` take an
exported file wherever they take a checkpoint. ``open_tensors`` picks the reader.
"""

from __future__ import annotations

import difflib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from orchestrator.checkpoint.dtypes import bfloat16
from orchestrator.checkpoint.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedDtypeError
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.structure import STRUCTURE_KEY

SUFFIX = ".safetensors"
METADATA_STRUCTURE = "structure"  # __metadata__ key holding the structure record (JSON text)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
_ALIGN = 8
_CODES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype.newbyteorder("="): code for code, dtype in _CODES.items()}
_BF16 = "BF16"  # outside the tables: ml_dtypes is imported only when a bfloat16 tensor is met


def _code_dtype(code: Any) -> np.dtype | None:
    return bfloat16() if code == _BF16 else _CODES.get(code)


# ---------------------------------------------------------------------------- writing
def dtype_code(dtype: Any) -> str | None:
    """The safetensors dtype code of a numpy dtype, or None when it has none (strings, complex)."""
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype.name == "bfloat16" and dtype == bfloat16():
        return _BF16
    return _NAMES.get(dtype)


def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The whole file as bytes; tensors laid out in name order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = np.asarray(tensors[name], order="C")  # ascontiguousarray would make a 0-d tensor 1-d
        code = dtype_code(data.dtype)
        if code is None:
            raise UnsupportedDtypeError(f"tensor {name!r}: dtype {data.dtype} has no safetensors equivalent")
        raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(data.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of the file, in the shape ``inspect`` expects of a checkpoint entry."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    size: int
    slices: tuple = ()


class SafetensorsReader:
    """A ``.safetensors`` file read like a checkpoint (see the module docstring)."""

    num_shards = 1

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None = None):
        self._storage, self.prefix = Storage.for_path(path, storage_options)
        try:
            file_size = self._storage.size(self.prefix)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no such file: {self.prefix}") from None
        header, self._data_start = _read_header(self._storage, self.prefix, file_size)
        self.metadata = _metadata(header.pop("__metadata__", {}), self.prefix)
        self._entries = _entries(header, self.prefix, file_size - self._data_start)
        self._structure = self.metadata.get(METADATA_STRUCTURE)
        self._names = sorted([*self._entries, *([STRUCTURE_KEY] if self._structure is not None else [])])

    def close(self) -> None:
        """Nothing stays open; here for symmetry with ``CheckpointReader``."""

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._names)

    def has_tensor(self, name: str) -> bool:
        return name in self._names

    __contains__ = has_tensor

    def entry(self, name: str) -> SafetensorsEntry:
        if name == STRUCTURE_KEY and self._structure is not None:
            return SafetensorsEntry(name, "string", (), 0, len(self._structure.encode("utf-8")))
        if name not in self._entries:
            raise CheckpointNotFoundError(f"tensor {name!r} not found in {self.prefix}{_close(name, self._names)}")
        return self._entries[name]

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        return {name: list(self.entry(name).shape) for name in self._names}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
        return {name: _numpy_dtype(self.entry(name)) for name in self._names}

    def stored_nbytes(self, name: str) -> int:
        return self.entry(name).size

    def shard_ids(self, name: str) -> tuple[int, ...]:
        self.entry(name)
        return (0,)

    def get_tensor(self, name: str) -> np.ndarray:
        return self.get_tensors([name])[name]

    def get_tensors(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The named tensors (all by default); unknown names raise before any data is read."""
        wanted = self.keys() if names is None else list(dict.fromkeys(names))
        entries = [self.entry(name) for name in wanted]
        pods = [e for e in entries if e.name != STRUCTURE_KEY]
        ranges = [(self.prefix, self._data_start + e.offset, e.size) for e in pods]
        values = {e.name: _array(e, raw, self.prefix) for e, raw in zip(pods, self._storage.read_ranges(ranges))}
        if STRUCTURE_KEY in wanted:
            values[STRUCTURE_KEY] = np.array(self._structure.encode("utf-8"), dtype=object)
        return {name: values[name] for name in wanted}


def is_safetensors(path: str) -> bool:
    return str(path).endswith(SUFFIX)


def open_tensors(path: str, storage_options: Mapping[str, Any] | None = None):
    """A reader for a ``.safetensors`` file, or for a checkpoint (prefix, or a directory's latest)."""
    from orchestrator.checkpoint.reader import load_checkpoint

    if is_safetensors(path):
        return SafetensorsReader(path, storage_options)
    return load_checkpoint(path, storage_options)


# ---------------------------------------------------------------------------- parsing
def _read_header(storage: Storage, path: str, file_size: int) -> tuple[dict, int]:
    if file_size < 8:
        raise CorruptCheckpointError(f"{path}: not a safetensors file ({file_size} bytes, no header length)")
    (length,) = struct.unpack("<Q", storage.read_ranges([(path, 0, 8)])[0])
    if length > min(file_size - 8, MAX_HEADER_BYTES):
        raise CorruptCheckpointError(f"{path}: safetensors header length {length} exceeds the file "
                                     f"({file_size} bytes) or the {MAX_HEADER_BYTES}-byte limit")
    raw = storage.read_ranges([(path, 8, length)])[0]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header must be a JSON object")
    return header, 8 + length


def _metadata(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CorruptCheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    return value


def _entries(header: dict, path: str, data_size: int) -> dict[str, SafetensorsEntry]:
    entries = {name: _entry(name, info, f"{path}: tensor {name!r}") for name, info in header.items()}
    end = 0
    for entry in sorted(entries.values(), key=lambda e: e.offset):
        if entry.offset != end:
            raise CorruptCheckpointError(f"{path}: tensor {entry.name!r} starts at byte {entry.offset} of the "
                                         f"data, expected {end} (tensors must be contiguous, without overlap)")
        end = entry.offset + entry.size
    if end != data_size:
        raise CorruptCheckpointError(f"{path}: tensors cover {end} bytes of data but the file holds {data_size}")
    return entries


def _entry(name: str, info: Any, where: str) -> SafetensorsEntry:
    if name == STRUCTURE_KEY:
        raise CorruptCheckpointError(f"{where}: name reserved for the structure record")
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or _code_dtype(info["dtype"]) is None:
        dtype = info.get("dtype") if isinstance(info, dict) else None
        raise CorruptCheckpointError(f"{where}: unknown or missing dtype {dtype!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CorruptCheckpointError(f"{where}: bad shape {shape!r} or data_offsets {offsets!r}")
    dtype = _code_dtype(info["dtype"])
    if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
        raise CorruptCheckpointError(f"{where}: {info['dtype']}{shape} needs {math.prod(shape) * dtype.itemsize} "
                                     f"bytes but data_offsets span {offsets[1] - offsets[0]}")
    return SafetensorsEntry(name, dtype.name, tuple(shape), offsets[0], offsets[1] - offsets[0])


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _numpy_dtype(entry: SafetensorsEntry) -> np.dtype:
    if entry.name == STRUCTURE_KEY:
        return np.dtype(object)
    return bfloat16() if entry.dtype_name == "bfloat16" else np.dtype(entry.dtype_name)


def _array(entry: SafetensorsEntry, raw: bytes, path: str) -> np.ndarray:
    if len(raw) != entry.size:
        raise CorruptCheckpointError(f"{path}: tensor {entry.name!r} is truncated ({len(raw)} of {entry.size} bytes)")
    dtype = _numpy_dtype(entry).newbyteorder("<")
    return np.frombuffer(bytearray(raw), dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(entry.shape)


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""

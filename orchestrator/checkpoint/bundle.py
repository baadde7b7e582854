"""Writing a tensor bundle: independent shard writers, then one merged index (the commit).

Call sequence of a sharded save (reference section 9):

1. (every shard, possibly on different hosts) ``ShardWriter(prefix, i, M, storage)``,
   ``add``/``add_slice`` each tensor it owns, ``finish()`` -> ``ShardResult``. The data
   file ``<prefix>.data-0000i-of-0000M`` appears whole or not at all.
2. (one coordinator) ``write_index(prefix, results, storage)`` merges every shard's
   entries into one sorted ``<prefix>.index``, written atomically. Until it exists the
   checkpoint does not exist: the index is the commit point.

Tensor keys are ``str``; keys that are not valid UTF-8 (slice keys, section 6) are carried
as ``str`` with ``surrogateescape`` so they round-trip to the exact bytes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint import crc, dtypes, slices, table
from orchestrator.checkpoint.coding import encode_varint
from orchestrator.checkpoint.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointWriteError,
    UnsupportedDtypeError,
)
from orchestrator.checkpoint.protos import BundleEntryProto, BundleHeaderProto
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.variables import to_host

BUNDLE_VERSION = 1  # kTensorBundleVersion
HEADER_KEY = b""
WRITE_CHUNK = 8 * 1024 * 1024  # tensors above 2 chunks overlap the write and the CRC


# ---------------------------------------------------------------------------- names
def data_filename(prefix: str, shard_id: int, num_shards: int) -> str:
    return "%s.data-%05d-of-%05d" % (prefix, shard_id, num_shards)


def index_filename(prefix: str) -> str:
    return f"{prefix}.index"


def key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def key_str(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ShardResult:
    """What one finished shard contributes to the index. Plain data: crosses Ray actors.

    ``entries`` maps each tensor key to its serialized ``BundleEntryProto`` (with this
    shard's id); a partitioned tensor's full entry lists the slices this shard holds.
    """

    shard_id: int
    num_shards: int
    data_path: str
    nbytes: int
    entries: dict[str, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------------------- encoding
def _pod_bytes(array: np.ndarray) -> np.ndarray:
    """The tensor's little-endian C-order bytes as a flat uint8 view (copies only if needed)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _as_bytes(item: Any, name: str) -> bytes:
    if isinstance(item, (bytes, np.bytes_)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("utf-8")
    raise UnsupportedDtypeError(f"tensor {name!r}: string tensors hold bytes or str, got {type(item).__name__}")


def encode_string_tensor(array: np.ndarray, name: str) -> tuple[list[bytes], int, int]:
    """DT_STRING layout (reference 5.2): ``(chunks, size, masked crc)``."""
    items = [_as_bytes(x, name) for x in array.reshape(-1).tolist()]
    lengths = [len(x) for x in items]
    varints = b"".join(encode_varint(n) for n in lengths)
    running = 0
    for n in lengths:
        running = crc.extend(running, n.to_bytes(4 if n <= 0xFFFFFFFF else 8, "little"))
    length_crc = crc.mask(running).to_bytes(4, "little")
    running = crc.extend(running, length_crc)
    for item in items:
        running = crc.extend(running, item)
    chunks = [varints, length_crc, *items]
    return chunks, sum(len(c) for c in chunks), crc.mask(running)


def make_entry(enum: int, shape, shard_id: int = 0, offset: int = 0, size: int = 0,
               masked_crc: int = 0) -> BundleEntryProto:
    entry = BundleEntryProto(dtype=enum, shard_id=shard_id, offset=offset, size=size, crc32c=masked_crc)
    entry.shape.SetInParent()  # TF always writes the shape, even `12 00` for a scalar
    for dim in shape:
        entry.shape.dim.add(size=int(dim))
    return entry


def header_bytes(num_shards: int) -> bytes:
    header = BundleHeaderProto(num_shards=num_shards)
    header.version.producer = BUNDLE_VERSION
    return header.SerializeToString()


# ---------------------------------------------------------------------------- shard writer
class ShardWriter:
    """Writes one data file of a bundle, streaming each tensor as it is added.

    Knows only its shard id and count. The file is written through
    ``storage.write_atomic``: it appears under its final name at ``finish()`` or not at
    all; ``abort()`` (or leaving a ``with`` block by an exception) removes it.
    """

    def __init__(self, prefix: str, shard_id: int, num_shards: int, storage: Storage):
        if not 0 <= shard_id < num_shards:
            raise InvalidCheckpointWriteError(f"shard id {shard_id} outside 0..{num_shards - 1} for {prefix}")
        self.prefix = prefix
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.storage = storage
        self.data_path = data_filename(prefix, shard_id, num_shards)
        self._ctx = None
        self._file = None
        self._offset = 0
        self._entries: dict[str, bytes] = {}
        self._full: dict[str, BundleEntryProto] = {}
        self._state = "open"

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    # -- adding tensors
    def add(self, name: str, array: Any) -> None:
        """Append one whole tensor."""
        self._check_new_key(name)
        self._write_tensor(name, np.asarray(to_host(array)))

    def add_slice(self, name: str, full_shape: Sequence[int], starts: Sequence[int],
                  lengths: Sequence[int], array: Any) -> None:
        """Append one piece of a partitioned tensor (``length -1`` = whole dimension)."""
        array = np.asarray(to_host(array))
        try:
            extents = slices.make_extents(full_shape, starts, lengths)
        except ValueError as exc:
            raise InvalidCheckpointWriteError(f"tensor {name!r}: bad slice: {exc}") from None
        expected = slices.slice_shape(full_shape, extents)
        if array.shape != expected:
            raise InvalidCheckpointWriteError(
                f"tensor {name!r}: slice array has shape {array.shape}, the extents describe {expected}")
        if slices.covers_whole(full_shape, extents):
            self.add(name, array)
            return
        enum = dtypes.from_numpy(array.dtype, f"tensor {name!r}")
        if enum not in dtypes.SLICEABLE:
            raise UnsupportedDtypeError(
                f"tensor {name!r}: TensorFlow cannot reassemble sliced {dtypes.dtype_name(enum)} tensors")
        slice_key = key_str(slices.slice_key(key_bytes(name), extents))
        self._check_new_key(slice_key)
        self._add_to_full_entry(name, enum, full_shape, extents)
        self._write_tensor(slice_key, array)

    # -- completing
    def finish(self) -> ShardResult:
        """Close the data file under its final name and return this shard's entries."""
        self._require_open()
        self._open_file()
        self._state = "closing"
        try:
            self._ctx.__exit__(None, None, None)  # flush, fsync, move into place
        except BaseException:
            self._state = "aborted"  # write_atomic already removed the partial file
            raise
        self._state = "finished"
        entries = dict(self._entries)
        for name, full in self._full.items():
            entries[name] = full.SerializeToString()
        return ShardResult(self.shard_id, self.num_shards, self.data_path, self._offset, entries)

    def abort(self) -> None:
        """Remove whatever this writer wrote. Safe to call more than once."""
        if self._state == "finished":
            self.storage.rm(self.data_path)
        elif self._ctx is not None and self._state in ("open", "failed"):
            self._ctx.__exit__(_Aborted, _Aborted(self.data_path), None)
        self._state = "aborted"

    # -- helpers
    def _require_open(self) -> None:
        if self._state != "open":
            raise InvalidCheckpointWriteError(f"{self.data_path}: writer is already {self._state}")

    def _check_new_key(self, name: str) -> None:
        self._require_open()
        if not isinstance(name, str) or not name:
            raise InvalidCheckpointWriteError(f"{self.data_path}: tensor names must be non-empty str, got {name!r}")
        if name in self._entries or name in self._full:
            raise InvalidCheckpointWriteError(f"{self.data_path}: tensor {name!r} added twice")

    def _open_file(self) -> None:
        if self._ctx is None:
            self._ctx = self.storage.write_atomic(self.data_path)
            self._file = self._ctx.__enter__()

    def _write_tensor(self, key: str, array: np.ndarray) -> None:
        enum = dtypes.from_numpy(array.dtype, f"tensor {key!r}")
        self._open_file()
        try:
            size, masked = self._write_payload(key, enum, array)
        except BaseException:
            self._state = "failed"  # the file may hold part of this tensor: only abort() is left
            raise
        entry = make_entry(enum, array.shape, self.shard_id, self._offset, size, masked)
        self._entries[key] = entry.SerializeToString()
        self._offset += size

    def _write_payload(self, key: str, enum: int, array: np.ndarray) -> tuple[int, int]:
        """Stream the tensor's bytes to the file; returns ``(size, masked crc)``."""
        if dtypes.is_string(enum):
            chunks, size, masked = encode_string_tensor(array, key)
            for chunk in chunks:
                if chunk:
                    self._file.write(chunk)
            return size, masked
        data = _pod_bytes(array)
        return data.nbytes, crc.mask(_write_and_checksum(self._file, data))

    def _add_to_full_entry(self, name: str, enum: int, full_shape, extents) -> None:
        if name in self._entries:
            raise InvalidCheckpointWriteError(f"{self.data_path}: tensor {name!r} added both whole and sliced")
        full = self._full.get(name)
        if full is None:
            full = self._full[name] = make_entry(enum, full_shape, self.shard_id)
        shape = tuple(d.size for d in full.shape.dim)
        if full.dtype != enum or shape != tuple(int(d) for d in full_shape):
            raise InvalidCheckpointWriteError(
                f"tensor {name!r}: slice of {dtypes.dtype_name(enum)}{tuple(full_shape)} does not match "
                f"earlier slices of {dtypes.dtype_name(full.dtype)}{shape}")
        full.slices.append(slices.to_proto(extents))


def _write_and_checksum(file, data: np.ndarray) -> int:
    """Write a flat uint8 view and return its CRC32C.

    Big tensors are written in chunks by a helper thread (writes release the GIL) while
    this thread checksums them, so the CRC costs almost no extra time.
    """
    if data.nbytes < 2 * WRITE_CHUNK:
        if data.nbytes:
            file.write(data)
        return crc.crc32c(data)
    chunks = [data[start:start + WRITE_CHUNK] for start in range(0, data.nbytes, WRITE_CHUNK)]
    running = 0
    with ThreadPoolExecutor(max_workers=1) as io:
        writes = [io.submit(file.write, chunk) for chunk in chunks]
        for chunk in chunks:
            running = crc.extend(running, chunk)
        for pending in writes:
            pending.result()
    return running


class _Aborted(Exception):
    """Thrown into ``Storage.write_atomic`` so that it removes the partial file."""


# ---------------------------------------------------------------------------- index (commit)
def merge_results(results: Sequence[ShardResult]) -> tuple[dict[str, bytes], int]:
    """Validate the shards and merge their entries; returns ``(entries, num_shards)``."""
    results = list(results)
    if not results:
        raise InvalidCheckpointWriteError("no shard results to index")
    num_shards = results[0].num_shards
    ids = sorted(r.shard_id for r in results)
    if any(r.num_shards != num_shards for r in results) or ids != list(range(num_shards)):
        found = [(r.shard_id, r.num_shards) for r in results]
        raise InvalidCheckpointWriteError(
            f"shard results must be ids 0..{num_shards - 1} exactly once, all of {num_shards} shards; "
            f"got (id, count) {found}")
    merged: dict[str, bytes] = {}
    for result in sorted(results, key=lambda r: r.shard_id):
        for key, value in result.entries.items():
            merged[key] = _merge_entry(key, merged[key], value) if key in merged else value
    return merged, num_shards


def _merge_entry(key: str, first: bytes, second: bytes) -> bytes:
    a, b = BundleEntryProto.FromString(first), BundleEntryProto.FromString(second)
    if not (a.slices and b.slices):
        raise InvalidCheckpointWriteError(f"tensor {key!r} is written by more than one shard")
    if a.dtype != b.dtype or a.shape != b.shape:
        raise InvalidCheckpointWriteError(f"tensor {key!r}: shards disagree on its dtype or full shape")
    a.slices.extend(b.slices)
    return a.SerializeToString()


def build_index_bytes(entries: Mapping[str, bytes], num_shards: int) -> bytes:
    """The ``.index`` file for ``entries`` (key -> serialized BundleEntryProto)."""
    encoded = sorted((key_bytes(k), v) for k, v in entries.items())
    if encoded and encoded[0][0] == HEADER_KEY:
        raise InvalidCheckpointWriteError("the empty tensor name is reserved for the bundle header")
    return table.build_table([(HEADER_KEY, header_bytes(num_shards)), *encoded])


def write_index(prefix: str, results: Sequence[ShardResult], storage: Storage) -> None:
    """Commit a checkpoint: check every shard's data file, then write the merged index atomically."""
    entries, num_shards = merge_results(results)
    for result in results:
        _check_data_file(prefix, result, storage)
    storage.write_bytes(index_filename(prefix), build_index_bytes(entries, num_shards))


def _check_data_file(prefix: str, result: ShardResult, storage: Storage) -> None:
    path = data_filename(prefix, result.shard_id, result.num_shards)
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: data shard {result.shard_id} is missing; not committing") from None
    if size != result.nbytes:
        raise InvalidCheckpointWriteError(
            f"{path}: data shard is {size} bytes but its writer reported {result.nbytes}; not committing")

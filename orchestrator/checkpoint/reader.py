"""Reading TensorFlow V2 checkpoints: ``CheckpointReader``, ``load_checkpoint``, ``list_variables``.

Opening a reader reads only the ``.index`` (small) and validates every entry against
it; data files are touched only when a tensor is asked for, and then only that
tensor's byte range is fetched, straight into the array's buffer, and its CRC checked.
Nothing here unpickles or executes anything from the checkpoint.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from orchestrator.checkpoint import bundle, coding, crc, dtypes, slices, table
from orchestrator.checkpoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    CRCMismatchError,
    UnsupportedVersionError,
)
from orchestrator.checkpoint.protos import BundleEntryProto, BundleHeaderProto
from orchestrator.checkpoint.storage import Storage

CONSUMER_VERSION = 1  # we read what TF's BundleReader reads (kTensorBundleVersion)
READ_CHUNK = 2 * 1024 * 1024  # local reads of 2 chunks or more overlap the read and the CRC
MIN_TAIL_CHUNK = 256 * 1024
MAX_RANK = 64  # numpy's limit; TF's own is higher but no real checkpoint comes close
_LITTLE = BundleHeaderProto.Endianness.Value("LITTLE")


@dataclass(frozen=True)
class TensorEntry:
    """Where and what one tensor is, as the index describes it.

    ``slices`` is empty for an ordinary tensor; for a partitioned one it lists each
    stored piece's extents, and ``offset``/``size`` are those of no single piece.
    """

    name: str
    tf_dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    slices: tuple[tuple[slices.Extent, ...], ...] = ()

    @property
    def dtype_name(self) -> str:
        return dtypes.dtype_name(self.tf_dtype)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


class CheckpointReader:
    """Random access to the tensors of one checkpoint (``<prefix>.index`` + data files)."""

    def __init__(self, prefix: str, storage_options: Mapping[str, Any] | None = None):
        self._storage, self.prefix = Storage.for_path(prefix, storage_options)
        self.index_path = bundle.index_filename(self.prefix)
        self._file_sizes: dict[int, int] = {}
        index = table.Table(self._read_index(), self.index_path)
        self.num_shards, self._entries = _parse_entries(index, self.index_path)
        self._names = _visible_names(self._entries, self.index_path)

    # ------------------------------------------------------------------ introspection
    def keys(self) -> list[str]:
        """Tensor names, sorted; slice pieces of partitioned tensors are hidden."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def has_tensor(self, name: str) -> bool:
        return name in self._names

    def entry(self, name: str) -> TensorEntry:
        if name not in self._names:
            raise CheckpointNotFoundError(f"tensor {name!r} not found in checkpoint {self.prefix}")
        return self._entries[name]

    def entries(self) -> list[TensorEntry]:
        return [self._entries[name] for name in self._names]

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        return {name: list(self._entries[name].shape) for name in self._names}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
        return {name: self._numpy_dtype(self._entries[name]) for name in self._names}

    def data_paths(self) -> list[str]:
        return [bundle.data_filename(self.prefix, i, self.num_shards) for i in range(self.num_shards)]

    def shard_ids(self, name: str) -> tuple[int, ...]:
        """The data shard(s) holding the tensor (several for a partitioned one)."""
        entry = self.entry(name)
        if not entry.slices:
            return (entry.shard_id,)
        return tuple(sorted({self._slice_entry(entry, ext).shard_id for ext in entry.slices}))

    def stored_nbytes(self, name: str) -> int:
        """Bytes the tensor occupies in the data files (all pieces of a partitioned one)."""
        entry = self.entry(name)
        if not entry.slices:
            return entry.size
        return sum(self._slice_entry(entry, ext).size for ext in entry.slices)

    # ------------------------------------------------------------------ values
    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor's value (CRC-checked); partitioned tensors come back whole."""
        entry = self.entry(name)
        if entry.slices:
            return self._assemble(entry)
        return self._read_value(entry)

    def verify(self) -> None:
        """Check that every data shard exists and every tensor's bytes match their CRC."""
        for shard_id in range(self.num_shards):
            self._shard_size(shard_id)
        for name in self._names:
            self.get_tensor(name)

    # ------------------------------------------------------------------ internals
    def _read_index(self) -> bytes:
        try:
            return self._storage.read_bytes(self.index_path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.prefix}: index file {self.index_path} not found") from None

    def _numpy_dtype(self, entry: TensorEntry) -> np.dtype:
        if entry.tf_dtype == dtypes.DT_VARIANT:
            return dtypes.OBJECT
        return dtypes.to_numpy(entry.tf_dtype, f"{self.index_path}: tensor {entry.name!r}")

    def _data_path(self, entry: TensorEntry) -> str:
        return bundle.data_filename(self.prefix, entry.shard_id, self.num_shards)

    def _shard_size(self, shard_id: int, tensor: str | None = None) -> int:
        """The data file's size (one stat per shard, cached); missing -> typed error."""
        if shard_id not in self._file_sizes:
            path = bundle.data_filename(self.prefix, shard_id, self.num_shards)
            try:
                self._file_sizes[shard_id] = self._storage.size(path)
            except FileNotFoundError:
                needed = f" (needed for tensor {tensor!r})" if tensor else ""
                raise CheckpointNotFoundError(
                    f"{path}: data shard {shard_id} of checkpoint {self.prefix} is missing{needed}") from None
        return self._file_sizes[shard_id]

    def _read_bytes(self, entry: TensorEntry) -> tuple[np.ndarray, int]:
        """The entry's stored bytes (writable uint8 array, bounds-checked first) and their CRC32C."""
        path = self._data_path(entry)
        file_size = self._shard_size(entry.shard_id, entry.name)
        if entry.offset + entry.size > file_size:
            raise CorruptCheckpointError(
                f"{path}: tensor {entry.name!r} at offset {entry.offset} size {entry.size} "
                f"extends beyond the file ({file_size} bytes)")
        buf, checksum = _read_range(self._storage, path, entry.offset, entry.size)
        if buf.nbytes != entry.size:
            raise CorruptCheckpointError(
                f"{path}: tensor {entry.name!r}: read {buf.nbytes} of {entry.size} bytes (file truncated?)")
        return buf, checksum

    def _read_value(self, entry: TensorEntry) -> np.ndarray:
        dtype = self._numpy_dtype(entry)
        buf, checksum = self._read_bytes(entry)
        where = f"{self._data_path(entry)}: tensor {entry.name!r}"
        if dtypes.is_string(entry.tf_dtype):
            return _decode_strings(buf, entry, where)
        if entry.tf_dtype == dtypes.DT_VARIANT:
            return _decode_variants(buf, entry, where)
        if checksum != crc.unmask(entry.crc32c):
            raise CRCMismatchError(f"{where}: checksum mismatch ({entry.size} bytes at offset {entry.offset})")
        return buf.view(dtype).reshape(entry.shape)

    def _slice_entry(self, full: TensorEntry, extents) -> TensorEntry:
        key = bundle.key_str(slices.slice_key(bundle.key_bytes(full.name), extents))
        piece = self._entries.get(key)
        if piece is None:
            raise CorruptCheckpointError(f"{self.index_path}: a slice of partitioned tensor {full.name!r} is missing")
        return piece

    def _checked_piece(self, full: TensorEntry, extents) -> TensorEntry:
        """The slice's entry, checked against the full entry and its data file before any read."""
        piece = self._slice_entry(full, extents)
        expected = slices.slice_shape(full.shape, extents)
        if piece.shape != expected or piece.tf_dtype != full.tf_dtype:
            raise CorruptCheckpointError(
                f"{self.index_path}: slice of tensor {full.name!r} is {piece.dtype_name}{list(piece.shape)}, "
                f"expected {full.dtype_name}{list(expected)}")
        if piece.offset + piece.size > self._shard_size(piece.shard_id, full.name):
            raise CorruptCheckpointError(
                f"{self._data_path(piece)}: slice of tensor {full.name!r} extends beyond the file")
        return piece

    def _assemble(self, full: TensorEntry) -> np.ndarray:
        dtype = self._numpy_dtype(full)
        pieces = [(extents, self._checked_piece(full, extents)) for extents in full.slices]
        if sum(piece.num_elements for _, piece in pieces) < full.num_elements:
            raise CorruptCheckpointError(
                f"{self.index_path}: the stored slices of tensor {full.name!r} are too small for {full.shape}")
        assembler = slices.Assembler(full.shape, dtype)  # bounded: the pieces are in the files
        for extents, piece in pieces:
            assembler.place(extents, self._read_value(piece))
        if not assembler.complete:
            raise CorruptCheckpointError(
                f"{self.index_path}: the stored slices of tensor {full.name!r} do not cover its shape {full.shape}")
        return assembler.array


# ---------------------------------------------------------------------------- data reads
def _read_range(storage: Storage, path: str, offset: int, size: int) -> tuple[np.ndarray, int]:
    """Read one byte range into a fresh writable buffer; return it with its CRC32C.

    On local disk the bytes go straight into the array (no intermediate copy), and for
    big ranges a helper thread checksums the chunks already read while this one reads
    on, so the CRC costs little extra time when a core is free.
    """
    if size == 0:
        return np.empty(0, dtype=np.uint8), 0
    if not storage.is_local:
        buf = np.frombuffer(bytearray(storage.read_range(path, offset, size)), dtype=np.uint8)
        return buf, crc.crc32c(buf)
    buf = np.empty(size, dtype=np.uint8)
    with storage.open_read(path) as f:
        f.seek(offset)
        if size < 2 * READ_CHUNK or not crc.releases_gil():
            filled = _readinto_fully(f, memoryview(buf))
            return buf[:filled], crc.crc32c(buf[:filled])
        return _read_and_checksum(f, buf)


class _RunningCrc:
    """A CRC32C extended chunk by chunk, in order (by one thread at a time)."""

    def __init__(self) -> None:
        self.value = 0

    def extend(self, chunk: np.ndarray) -> None:
        self.value = crc.extend(self.value, chunk)


def _read_and_checksum(f, buf: np.ndarray) -> tuple[np.ndarray, int]:
    """Read in chunks here while a helper thread checksums the chunks already read.

    The read and the native CRC both release the GIL, so with a free core they run in
    parallel. The CRC work the helper has not started when the read ends is taken back
    and done here, so on a busy machine this costs no more than read-then-checksum.
    """
    view = memoryview(buf)
    running = _RunningCrc()
    queued: list[tuple[Future, np.ndarray]] = []
    filled = 0
    with ThreadPoolExecutor(max_workers=1) as helper:
        while filled < buf.nbytes:
            wanted = _next_chunk(buf.nbytes - filled)
            got = _readinto_fully(f, view[filled:filled + wanted])
            chunk = buf[filled:filled + got]
            queued.append((helper.submit(running.extend, chunk), chunk))
            filled += got
            if got < wanted:
                break  # end of file: the caller reports the short read
        leftovers = _take_back_unstarted(queued)
    for chunk in leftovers:
        running.extend(chunk)
    return buf[:filled], running.value


def _next_chunk(remaining: int) -> int:
    """READ_CHUNK, halving towards the end: the last chunk's CRC is the part nothing overlaps."""
    return min(remaining, READ_CHUNK, max(remaining // 2, MIN_TAIL_CHUNK))


def _take_back_unstarted(queued: list[tuple[Future, np.ndarray]]) -> list[np.ndarray]:
    """Cancel the helper's tasks that have not started and wait for the others.

    One worker runs the tasks in submission order, so the unstarted ones are a suffix:
    cancelling from the end stops at the first task already started, and every chunk
    before it has been checksummed once that one finishes.
    """
    leftovers = []
    for future, chunk in reversed(queued):
        if not future.cancel():
            future.result()
            break
        leftovers.append(chunk)
    return leftovers[::-1]


def _readinto_fully(f, view: memoryview) -> int:
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def _decode_strings(buf: np.ndarray, entry: TensorEntry, where: str) -> np.ndarray:
    """DT_STRING layout: varint lengths, masked length CRC, then the bytes (reference 5.2)."""
    out = np.empty(entry.num_elements, dtype=object)
    if entry.size == 0:
        return out.reshape(entry.shape)
    data = buf.tobytes()
    lengths, pos = _string_lengths(data, entry.num_elements, where)
    running = 0
    for n in lengths:
        running = crc.extend(running, n.to_bytes(4 if n <= 0xFFFFFFFF else 8, "little"))
    if pos + 4 + sum(lengths) != len(data):
        raise CorruptCheckpointError(f"{where}: string lengths do not add up to the stored size {entry.size}")
    if crc.mask(running) != coding.decode_fixed32(data, pos):
        raise CRCMismatchError(f"{where}: checksum mismatch in the string lengths")
    if crc.extend(running, data[pos:]) != crc.unmask(entry.crc32c):
        raise CRCMismatchError(f"{where}: checksum mismatch ({entry.size} bytes at offset {entry.offset})")
    pos += 4
    for i, n in enumerate(lengths):
        out[i] = data[pos:pos + n]
        pos += n
    return out.reshape(entry.shape)


def _decode_variants(buf: np.ndarray, entry: TensorEntry, where: str) -> np.ndarray:
    """DT_VARIANT (reference 5.3): per element ``varint64 L | L bytes | masked running CRC``.

    The elements are serialized ``VariantTensorDataProto``s, returned as raw ``bytes``
    (decoding them needs TF's variant registry).
    """
    data = buf.tobytes()
    out = np.empty(entry.num_elements, dtype=object)
    running, pos = 0, 0
    for i in range(entry.num_elements):
        try:
            n, pos = coding.decode_varint(data, pos)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{where}: bad variant length ({exc})") from None
        if pos + n + 4 > len(data):
            raise CorruptCheckpointError(f"{where}: variant element {i} runs past the stored size {entry.size}")
        running = crc.extend(crc.extend(running, n.to_bytes(8, "little")), data[pos:pos + n])
        out[i] = data[pos:pos + n]
        stored = data[pos + n:pos + n + 4]
        if coding.decode_fixed32(stored) != crc.mask(running):
            raise CRCMismatchError(f"{where}: checksum mismatch in variant element {i}")
        running = crc.extend(running, stored)
        pos += n + 4
    if pos != len(data) or crc.mask(running) != entry.crc32c:
        raise CRCMismatchError(f"{where}: checksum mismatch ({entry.size} bytes at offset {entry.offset})")
    return out.reshape(entry.shape)


def _string_lengths(data: bytes, count: int, where: str) -> tuple[list[int], int]:
    lengths = []
    pos = 0
    try:
        for _ in range(count):
            n, pos = coding.decode_varint(data, pos)
            lengths.append(n)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: bad string length ({exc})") from None
    return lengths, pos


# ---------------------------------------------------------------------------- index parsing
def _parse_entries(index: table.Table, path: str) -> tuple[int, dict[str, TensorEntry]]:
    """``(num_shards, {key: entry})`` from a parsed index; the header must come first."""
    items = iter(index.items())
    first = next(items, None)
    if first is None or first[0] != bundle.HEADER_KEY:
        raise CorruptCheckpointError(f"{path}: the index has no bundle header entry")
    num_shards = _check_header(_decode_proto(BundleHeaderProto, first[1], path, "the header"), path)
    entries = {}
    for key, value in items:
        name = bundle.key_str(key)
        proto = _decode_proto(BundleEntryProto, value, path, f"tensor {name!r}")
        entries[name] = _to_entry(name, proto, num_shards, path)
    return num_shards, entries


def _decode_proto(cls, data: bytes, path: str, what: str):
    try:
        return cls.FromString(data)
    except Exception as exc:  # protobuf raises DecodeError, and others on odd input
        raise CorruptCheckpointError(f"{path}: cannot parse {what}: {exc}") from None


def _check_header(header: BundleHeaderProto, path: str) -> int:
    version = header.version
    if version.producer < 0 or version.min_consumer > CONSUMER_VERSION or CONSUMER_VERSION in version.bad_consumers:
        raise UnsupportedVersionError(
            f"{path}: bundle version producer={version.producer} min_consumer={version.min_consumer} "
            f"bad_consumers={list(version.bad_consumers)} cannot be read by consumer version {CONSUMER_VERSION}")
    if header.endianness != _LITTLE:
        raise UnsupportedVersionError(f"{path}: big-endian checkpoints are not supported")
    if header.num_shards < 0:
        raise CorruptCheckpointError(f"{path}: header declares {header.num_shards} shards")
    return header.num_shards


def _to_entry(name: str, proto: BundleEntryProto, num_shards: int, path: str) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if len(proto.shape.dim) > MAX_RANK:
        raise CorruptCheckpointError(f"{where}: rank {len(proto.shape.dim)} exceeds {MAX_RANK}")
    if proto.shape.unknown_rank or any(d.size < 0 for d in proto.shape.dim):
        raise CorruptCheckpointError(f"{where}: invalid shape {[d.size for d in proto.shape.dim]}")
    shape = tuple(d.size for d in proto.shape.dim)
    extents = tuple(tuple(slices.from_proto(s)) for s in proto.slices)
    entry = TensorEntry(name, proto.dtype, shape, proto.shard_id, proto.offset, proto.size, proto.crc32c, extents)
    if extents:
        _check_slices(entry, where)
    else:
        _check_location(entry, num_shards, where)
        _check_size(entry, where)
    return entry


def _check_location(entry: TensorEntry, num_shards: int, where: str) -> None:
    if not 0 <= entry.shard_id < num_shards:
        raise CorruptCheckpointError(f"{where}: shard id {entry.shard_id} outside 0..{num_shards - 1}")
    if entry.offset < 0 or entry.size < 0:
        raise CorruptCheckpointError(f"{where}: negative offset {entry.offset} or size {entry.size}")


def _check_size(entry: TensorEntry, where: str) -> None:
    if dtypes.is_string(entry.tf_dtype):
        minimum = entry.num_elements + 4
        if entry.size < minimum and not (entry.size == 0 and entry.num_elements == 0):
            raise CorruptCheckpointError(
                f"{where}: {entry.size} bytes cannot hold {entry.num_elements} strings (at least {minimum})")
    elif entry.tf_dtype == dtypes.DT_VARIANT and entry.size < 5 * entry.num_elements:
        raise CorruptCheckpointError(f"{where}: {entry.size} bytes cannot hold {entry.num_elements} variants")
    elif dtypes.is_pod(entry.tf_dtype):
        expected = entry.num_elements * dtypes.element_size(entry.tf_dtype)
        if entry.size != expected:
            raise CorruptCheckpointError(
                f"{where}: entry size {entry.size} is inconsistent with {entry.dtype_name}{list(entry.shape)} "
                f"({expected} bytes)")


def _check_slices(entry: TensorEntry, where: str) -> None:
    for extents in entry.slices:
        if len(extents) != len(entry.shape):
            raise CorruptCheckpointError(f"{where}: a slice has rank {len(extents)}, the tensor {len(entry.shape)}")
        try:
            slices.make_extents(entry.shape, [e.start for e in extents], [e.length for e in extents])
        except ValueError as exc:
            raise CorruptCheckpointError(f"{where}: bad slice: {exc}") from None


def _visible_names(entries: dict[str, TensorEntry], path: str) -> list[str]:
    """Sorted names minus the slice pieces referenced by partitioned tensors."""
    hidden: set[str] = set()
    for entry in entries.values():
        for extents in entry.slices:
            key = bundle.key_str(slices.slice_key(bundle.key_bytes(entry.name), extents))
            if key in hidden:
                raise CorruptCheckpointError(f"{path}: tensor {entry.name!r} lists the same slice twice")
            hidden.add(key)
    return sorted((n for n in entries if n not in hidden), key=bundle.key_bytes)


# ---------------------------------------------------------------------------- entry points
def load_checkpoint(prefix_or_dir: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointReader:
    """A reader for a checkpoint prefix, or for a directory's latest checkpoint."""
    from orchestrator.checkpoint import state

    storage, path = Storage.for_path(prefix_or_dir, storage_options)
    if storage.exists(bundle.index_filename(path)):
        return CheckpointReader(path, storage_options)
    if storage.isdir(path):
        latest = state.latest_checkpoint(path, storage_options=storage_options)
        if latest is None:
            raise CheckpointNotFoundError(f"no checkpoint found in directory {path}")
        return CheckpointReader(latest, storage_options)
    raise CheckpointNotFoundError(f"no checkpoint at {path}: {bundle.index_filename(path)} not found")


def list_variables(path: str, storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, list[int]]]:
    """``[(name, shape)]`` sorted by name, like ``tf.train.list_variables``."""
    reader = load_checkpoint(path, storage_options)
    return [(name, list(reader.entry(name).shape)) for name in reader.keys()]

"""Reading TensorFlow V2 checkpoints: ``CheckpointReader``, ``load_checkpoint``, ``list_variables``.

Opening a reader reads only the ``.index`` (small) and validates every entry against
it; data files are touched only when a tensor is asked for, and then only that
tensor's byte range is fetched, straight into the array's buffer, and its CRC checked.
Local data files stay open for the reader's life (``close()`` or ``with`` releases
them), so reading tensor after tensor is one sequential stream to the kernel.
Nothing here unpickles or executes anything from the checkpoint.
"""

from __future__ import annotations

import difflib
import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from orchestrator.checkpoint import bundle, coding, crc, dtypes, legacy, slices, table
from orchestrator.checkpoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    CRCMismatchError,
    UnsupportedVersionError,
)
from orchestrator.checkpoint.protos import BundleEntryProto, BundleHeaderProto
from orchestrator.checkpoint.storage import LocalFile, Storage
from orchestrator.errors import InvalidArgumentError

CONSUMER_VERSION = 1  # we read what TF's BundleReader reads (kTensorBundleVersion)
READ_CHUNK = 1024 * 1024  # local reads of 2 chunks or more are split over the reading threads
VERIFY_BATCH_BYTES = 256 * 1024 * 1024
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
        self._open_files: dict[int, LocalFile] = {}
        self._open_lock = threading.Lock()
        self._closer = weakref.finalize(self, _close_all, self._open_files)
        index = table.Table(self._read_index(), self.index_path)
        self.num_shards, self._entries = _parse_entries(index, self.index_path)
        self._names = _visible_names(self._entries, self.index_path)

    def close(self) -> None:
        """Release the open data files (also done when the reader is garbage-collected)."""
        self._closer()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            close = difflib.get_close_matches(str(name), self._names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise CheckpointNotFoundError(f"tensor {name!r} not found in checkpoint {self.prefix}{hint}")
        return self._entries[name]

    def entries(self) -> list[TensorEntry]:
        return [self._entries[name] for name in self._names]

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        return {name: list(self._entries[name].shape) for name in self._names}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
        return {name: self._numpy_dtype(self._entries[name]) for name in self._names}

    def dtype(self, name: str) -> np.dtype:
        """The numpy dtype one tensor reads as; raises only for that tensor's dtype, so a
        tensor of a dtype this reader cannot decode does not stand in the way of the others."""
        return self._numpy_dtype(self.entry(name))

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

    def get_tensors(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Several tensors (all by default), each as ``get_tensor`` returns it.

        Their bytes are fetched together in file order: on local disk one sequential
        stream that all reading threads work through, on object stores concurrent
        range requests. Unknown names, missing shards and entries beyond their file
        raise before any data is read.
        """
        wanted = self.keys() if names is None else list(dict.fromkeys(names))
        entries = [self.entry(name) for name in wanted]
        pieces: dict[str, TensorEntry] = {}
        for entry in entries:
            for piece in self._stored_pieces(entry):
                if dtypes.is_pod(piece.tf_dtype):  # strings and variants decode (and check) one by one
                    pieces[piece.name] = piece
        fetched = self._fetch_pod(list(pieces.values()))
        values = {}
        for entry in entries:
            if entry.slices:
                values[entry.name] = self._assemble(entry, fetched)
            else:
                values[entry.name] = fetched[entry.name] if entry.name in fetched else self._read_value(entry)
        return values

    def verify(self) -> None:
        """Check that every data shard exists and every tensor's bytes match their CRC."""
        for shard_id in range(self.num_shards):
            self._shard_size(shard_id)
        batch, batch_bytes = [], 0
        for name in self._names:  # in batches, so memory stays bounded whatever the checkpoint's size
            batch.append(name)
            batch_bytes += self.stored_nbytes(name)
            if batch_bytes >= VERIFY_BATCH_BYTES:
                self.get_tensors(batch)
                batch, batch_bytes = [], 0
        self.get_tensors(batch)

    # ------------------------------------------------------------------ internals
    def _read_index(self) -> bytes:
        try:
            return self._storage.read_bytes(self.index_path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                legacy.v1_message(self._storage, self.prefix)
                or f"no checkpoint at {self.prefix}: index file {self.index_path} not found") from None
        except IsADirectoryError:
            raise CorruptCheckpointError(f"{self.index_path} is a directory, not a checkpoint index file") from None

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
                if self._storage.is_local:
                    self._file_sizes[shard_id] = self._local_file(shard_id).size
                else:
                    self._file_sizes[shard_id] = self._storage.size(path)
            except FileNotFoundError:
                needed = f" (needed for tensor {tensor!r})" if tensor else ""
                raise CheckpointNotFoundError(
                    f"{path}: data shard {shard_id} of checkpoint {self.prefix} is missing{needed}") from None
            except IsADirectoryError:
                raise CorruptCheckpointError(f"{path}: data shard {shard_id} is a directory, not a file") from None
        return self._file_sizes[shard_id]

    def _local_file(self, shard_id: int) -> LocalFile:
        """The shard's data file, opened once and kept open (raises FileNotFoundError)."""
        with self._open_lock:
            if not self._closer.alive:
                raise InvalidArgumentError(f"checkpoint reader for {self.prefix} is closed")
            opened = self._open_files.get(shard_id)
            if opened is None:
                path = bundle.data_filename(self.prefix, shard_id, self.num_shards)
                opened = self._open_files[shard_id] = self._storage.open_local(path)
            return opened

    def _check_in_file(self, entry: TensorEntry) -> None:
        """Raise before reading if the entry's bytes cannot all be in its data file."""
        file_size = self._shard_size(entry.shard_id, entry.name)
        if entry.offset + entry.size > file_size:
            raise CorruptCheckpointError(
                f"{self._data_path(entry)}: tensor {entry.name!r} at offset {entry.offset} size {entry.size} "
                f"extends beyond the file ({file_size} bytes)")

    def _read_bytes(self, entry: TensorEntry) -> tuple[np.ndarray, int]:
        """The entry's stored bytes (writable uint8 array, bounds-checked first) and their CRC32C."""
        self._check_in_file(entry)
        [(buf, checksum)] = self._read_entries([entry])
        self._check_complete(entry, buf)
        return buf, checksum

    def _read_entries(self, entries: list[TensorEntry]) -> list[tuple[np.ndarray, int]]:
        """Each entry's stored bytes (a fresh writable array) and their CRC32C, read together."""
        if self._storage.is_local:
            return _read_local_ranges([(self._local_file(e.shard_id), e.offset, e.size) for e in entries])
        return _read_remote_ranges(self._storage, [(self._data_path(e), e.offset, e.size) for e in entries])

    def _check_complete(self, entry: TensorEntry, buf: np.ndarray) -> None:
        if buf.nbytes != entry.size:
            raise CorruptCheckpointError(
                f"{self._data_path(entry)}: tensor {entry.name!r}: read {buf.nbytes} of {entry.size} bytes "
                f"(file truncated?)")

    def _read_value(self, entry: TensorEntry) -> np.ndarray:
        buf, checksum = self._read_bytes(entry)
        where = f"{self._data_path(entry)}: tensor {entry.name!r}"
        if dtypes.is_string(entry.tf_dtype):
            return _decode_strings(buf, entry, where)
        if entry.tf_dtype == dtypes.DT_VARIANT:
            return _decode_variants(buf, entry, where)
        return self._pod_value(entry, buf, checksum)

    def _pod_value(self, entry: TensorEntry, buf: np.ndarray, checksum: int) -> np.ndarray:
        if checksum != crc.unmask(entry.crc32c):
            raise CRCMismatchError(f"{self._data_path(entry)}: tensor {entry.name!r}: checksum mismatch "
                                   f"({entry.size} bytes at offset {entry.offset})")
        return _shaped(buf.view(self._numpy_dtype(entry)), entry, f"{self._data_path(entry)}: tensor {entry.name!r}")

    def _stored_pieces(self, entry: TensorEntry) -> list[TensorEntry]:
        """The entries whose bytes make up the tensor, each checked to lie in its file."""
        if entry.slices:
            return [self._checked_piece(entry, extents) for extents in entry.slices]
        self._check_in_file(entry)
        return [entry]

    def _fetch_pod(self, pieces: list[TensorEntry]) -> dict[str, np.ndarray]:
        """The CRC-checked values of plain-data entries, read together in file order."""
        pieces = sorted(pieces, key=lambda e: (e.shard_id, e.offset))
        values = {}
        for piece, (buf, checksum) in zip(pieces, self._read_entries(pieces)):
            self._check_complete(piece, buf)
            values[piece.name] = self._pod_value(piece, buf, checksum)
        return values

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

    def _assemble(self, full: TensorEntry, fetched: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The partitioned tensor, whole; pieces come from ``fetched`` where it has them."""
        dtype = self._numpy_dtype(full)
        pieces = [(extents, self._checked_piece(full, extents)) for extents in full.slices]
        if sum(piece.num_elements for _, piece in pieces) < full.num_elements:
            raise CorruptCheckpointError(
                f"{self.index_path}: the stored slices of tensor {full.name!r} are too small for {full.shape}")
        assembler = slices.Assembler(full.shape, dtype)  # bounded: the pieces are in the files
        for extents, piece in pieces:
            value = fetched.get(piece.name) if fetched else None
            assembler.place(extents, self._read_value(piece) if value is None else value)
        if not assembler.complete:
            raise CorruptCheckpointError(
                f"{self.index_path}: the stored slices of tensor {full.name!r} do not cover its shape {full.shape}")
        return assembler.array


# ---------------------------------------------------------------------------- data reads
def _close_all(files: dict[int, LocalFile]) -> None:
    for opened in files.values():
        opened.close()
    files.clear()


REMOTE_BATCH_BYTES = 256 * 1024 * 1024  # ranges requested together; bounds the transient copies


def _read_remote_ranges(storage: Storage, ranges: list[tuple[str, int, int]]) -> list[tuple[np.ndarray, int]]:
    """Ranged requests (object stores, memory://), issued together in batches of about ``REMOTE_BATCH_BYTES``;
    each range's bytes (a writable array) and their CRC32C."""
    results: list[tuple[np.ndarray, int]] = []
    for batch in _batches(ranges, REMOTE_BATCH_BYTES):
        for data in storage.read_ranges(batch):
            buf = np.frombuffer(bytearray(data), dtype=np.uint8)
            results.append((buf, crc.crc32c(buf)))
    return results


def _batches(ranges: list[tuple[str, int, int]], limit: int):
    batch, total = [], 0
    for item in ranges:
        if batch and total + item[2] > limit:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += item[2]
    if batch:
        yield batch


def _read_local_ranges(ranges: list[tuple[LocalFile, int, int]]) -> list[tuple[np.ndarray, int]]:
    """Read byte ranges of local files into fresh writable buffers; each with its CRC32C.

    The bytes go straight into the arrays (no intermediate copy). With 2 chunks' worth
    or more, this thread and the shared helpers read and checksum them together.
    """
    buffers = [np.empty(size, dtype=np.uint8) for _, _, size in ranges]
    native = crc.native_extend()
    if sum(size for _, _, size in ranges) < 2 * READ_CHUNK or native is None:
        results = []
        for (f, offset, _), buf in zip(ranges, buffers):
            filled = f.readinto(offset, memoryview(buf))
            results.append((buf[:filled], crc.crc32c(buf[:filled])))
        return results
    job = _ParallelRead([(f, offset, buf) for (f, offset, _), buf in zip(ranges, buffers)], READ_CHUNK, native)
    helpers, count = _read_helpers()
    tasks = [helpers.submit(job.work) for _ in range(count)]
    try:
        job.work()
    finally:
        job.release()  # helper tasks that have not started yet will find nothing to do
        for task in tasks:
            if not task.cancel():
                task.result()  # it is mid-chunk: wait, and surface its error if any
    return [(buf[:filled], checksum) for buf, (filled, checksum) in zip(buffers, job.results())]


class _ParallelRead:
    """Byte ranges read by several threads: each claims the next chunk, reads it, checksums it.

    Chunks are claimed in file order, so the disk sees one sequential stream. Each
    chunk is checksummed right after it is read, while it is still in the CPU's cache,
    and each range's chunk CRCs are combined in order at the end, so the copy out of
    the page cache and the CRC both spread over the cores. A busy helper costs
    nothing: the other threads simply claim its share.
    """

    def __init__(self, ranges: list[tuple[LocalFile, int, np.ndarray]], chunk: int, checksum: crc.NativeExtend):
        self._chunk, self._checksum = chunk, checksum
        self._work: list[tuple[LocalFile, int, memoryview, int]] | None = []  # file, position, destination, address
        self._meta: list[tuple[int, int]] = []  # per chunk: (range index, length)
        self._count = len(ranges)
        for index, (f, offset, buf) in enumerate(ranges):
            if not buf.nbytes:
                continue
            view, address = memoryview(buf), buf.ctypes.data
            for start in range(0, buf.nbytes, chunk):
                end = min(start + chunk, buf.nbytes)
                self._work.append((f, offset + start, view[start:end], address + start))
                self._meta.append((index, end - start))
        self._done: list[tuple[int, int] | None] = [None] * len(self._meta)  # (bytes read, crc)
        self._next = 0
        self._lock = threading.Lock()

    def work(self) -> None:
        work, checksum, done = self._work, self._checksum, self._done
        if work is None:
            return  # released before this helper task started
        while (i := self._claim()) is not None:
            f, position, destination, address = work[i]
            got = f.readinto(position, destination)
            done[i] = (got, checksum(0, address, got))

    def _claim(self) -> int | None:
        with self._lock:
            i = self._next
            self._next += 1
        return i if i < len(self._done) else None

    def release(self) -> None:
        """Drop the buffers: a finished helper task must not keep the arrays alive."""
        self._work = None
        with self._lock:
            self._next = len(self._done)

    def results(self) -> list[tuple[int, int]]:
        """Per range: (bytes read before its first short chunk, their CRC32C)."""
        filled, checksums, ended = [0] * self._count, [0] * self._count, [False] * self._count
        for (index, length), (got, piece) in zip(self._meta, self._done):
            if ended[index]:
                continue
            checksums[index] = crc.combine(checksums[index], piece, got, repeated=got == self._chunk)
            filled[index] += got
            ended[index] = got < length  # end of file: the caller reports the short read
        return list(zip(filled, checksums))


MAX_READ_HELPERS = 3
_helper_lock = threading.Lock()
_helper: tuple[ThreadPoolExecutor, int] | None = None


def _read_helpers() -> tuple[ThreadPoolExecutor, int]:
    """Idle-until-needed threads, one per spare core (at least one), shared by every reader."""
    global _helper
    with _helper_lock:
        if _helper is None:
            count = read_threads() - 1
            _helper = ThreadPoolExecutor(max_workers=count, thread_name_prefix="checkpoint-read"), count
        return _helper


def read_threads() -> int:
    """Threads a big local read spreads over: the caller plus one helper per spare core (at most 3)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return 1 + max(1, min(MAX_READ_HELPERS, cores - 1))


def _forget_helper_after_fork() -> None:
    global _helper, _helper_lock
    _helper, _helper_lock = None, threading.Lock()  # the parent's thread does not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helper_after_fork)


def _shaped(array: np.ndarray, entry: TensorEntry, where: str) -> np.ndarray:
    """``array`` in the entry's shape; a forged shape numpy cannot even describe (an empty tensor with
    dimensions whose product overflows) is a corrupt index, not a raw ValueError."""
    try:
        return array.reshape(entry.shape)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: shape {list(entry.shape)} cannot hold the stored data ({exc})") from None


def _decode_strings(buf: np.ndarray, entry: TensorEntry, where: str) -> np.ndarray:
    """DT_STRING layout: varint lengths, masked length CRC, then the bytes (reference 5.2)."""
    out = np.empty(entry.num_elements, dtype=object)
    if entry.size == 0:
        return _shaped(out, entry, where)
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
    return _shaped(out, entry, where)


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
    return _shaped(out, entry, where)


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
            named = state.get_checkpoint_state(path, storage_options=storage_options)
            v1 = named and legacy.v1_message(storage, named.model_checkpoint_path)
            raise CheckpointNotFoundError(v1 or f"no checkpoint found in directory {path}")
        return CheckpointReader(latest, storage_options)
    raise CheckpointNotFoundError(legacy.v1_message(storage, path)
                                  or f"no checkpoint at {path}: {bundle.index_filename(path)} not found")


def list_variables(path: str, storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, list[int]]]:
    """``[(name, shape)]`` sorted by name, like ``tf.train.list_variables``."""
    reader = load_checkpoint(path, storage_options)
    return [(name, list(reader.entry(name).shape)) for name in reader.keys()]

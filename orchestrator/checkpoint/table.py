"""LevelDB-style sorted string table, as TensorFlow writes a checkpoint's ``.index``.

Layout (reference section 3): data blocks, an always-empty metaindex block, an index
block, each followed by a 5-byte trailer (type byte + masked CRC32C), then a 48-byte
footer. ``TableBuilder`` reproduces TF's ``TableBuilder`` byte for byte (256 KiB
blocks, restart interval 16, shortest separators in the index), so our ``.index``
equals TF's for the same entries. ``Table`` parses one held in memory and validates
every offset, length and checksum against the bytes actually present, raising a
typed error that names the file: the index is untrusted input.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator

from orchestrator.checkpoint import coding, crc
from orchestrator.checkpoint.errors import CorruptCheckpointError, CRCMismatchError

BLOCK_SIZE = 262144
DATA_RESTART_INTERVAL = 16
INDEX_RESTART_INTERVAL = 1
FOOTER_SIZE = 48
TRAILER_SIZE = 5
MAGIC = 0xDB4775248B80FB57
NO_COMPRESSION = 0x00
SNAPPY_COMPRESSION = 0x01


# ---------------------------------------------------------------------------- keys
def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key ``k`` with ``start <= k < limit`` (LevelDB bytewise comparator)."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i >= n:
        return start  # one key is a prefix of the other
    byte = start[i]
    if byte < 0xFF and byte + 1 < limit[i]:
        return start[:i] + bytes([byte + 1])
    return start


def short_successor(key: bytes) -> bytes:
    """A short key ``>= key``: first non-0xff byte incremented, the rest dropped."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


# ---------------------------------------------------------------------------- handles
@dataclass(frozen=True)
class BlockHandle:
    """Where a block lives in the file; ``size`` excludes the 5-byte trailer."""

    offset: int
    size: int

    def encode(self) -> bytes:
        return coding.encode_varint(self.offset) + coding.encode_varint(self.size)

    @classmethod
    def decode(cls, buf: bytes, pos: int = 0) -> tuple["BlockHandle", int]:
        offset, pos = coding.decode_varint(buf, pos)
        size, pos = coding.decode_varint(buf, pos)
        return cls(offset, size), pos


# ---------------------------------------------------------------------------- writing
class BlockBuilder:
    """Prefix-compressed entries plus the restart array of one block."""

    def __init__(self, restart_interval: int):
        self._interval = restart_interval
        self._buf = bytearray()
        self._restarts = [0]
        self._counter = 0
        self._last_key = b""

    @property
    def empty(self) -> bool:
        return not self._buf

    def size_estimate(self) -> int:
        return len(self._buf) + 4 * len(self._restarts) + 4

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self._counter < self._interval:
            shared = _common_prefix_len(self._last_key, key)
        else:
            self._restarts.append(len(self._buf))
            self._counter = 0
        buf = self._buf
        buf += coding.encode_varint(shared)
        buf += coding.encode_varint(len(key) - shared)
        buf += coding.encode_varint(len(value))
        buf += key[shared:]
        buf += value
        self._last_key = key
        self._counter += 1

    def finish(self) -> bytes:
        tail = b"".join(coding.encode_fixed32(r) for r in self._restarts)
        return bytes(self._buf) + tail + coding.encode_fixed32(len(self._restarts))


def _common_prefix_len(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TableBuilder:
    """Builds a whole table in memory from entries added in strictly increasing key order."""

    def __init__(self, block_size: int = BLOCK_SIZE):
        self._block_size = block_size
        self._out = bytearray()
        self._data = BlockBuilder(DATA_RESTART_INTERVAL)
        self._index = BlockBuilder(INDEX_RESTART_INTERVAL)
        self._last_key: bytes | None = None
        self._pending: BlockHandle | None = None

    def add(self, key: bytes, value: bytes) -> None:
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"table keys must be strictly increasing: {key!r} after {self._last_key!r}")
        if self._last_key is not None and len(key) + len(value) >= 2 * self._block_size:
            self._flush()
        if self._pending is not None:
            self._index.add(shortest_separator(self._last_key, key), self._pending.encode())
            self._pending = None
        self._data.add(key, value)
        self._last_key = key
        if self._data.size_estimate() >= self._block_size:
            self._flush()

    def finish(self) -> bytes:
        self._flush()
        metaindex = self._write_block(BlockBuilder(DATA_RESTART_INTERVAL).finish())
        if self._pending is not None:
            self._index.add(short_successor(self._last_key), self._pending.encode())
            self._pending = None
        index = self._write_block(self._index.finish())
        self._out += _encode_footer(metaindex, index)
        return bytes(self._out)

    def _flush(self) -> None:
        if self._data.empty:
            return
        self._pending = self._write_block(self._data.finish())
        self._data = BlockBuilder(DATA_RESTART_INTERVAL)

    def _write_block(self, contents: bytes) -> BlockHandle:
        handle = BlockHandle(len(self._out), len(contents))
        type_byte = bytes([NO_COMPRESSION])
        self._out += contents
        self._out += type_byte
        self._out += coding.encode_fixed32(crc.mask(crc.extend(crc.crc32c(contents), type_byte)))
        return handle


def _encode_footer(metaindex: BlockHandle, index: BlockHandle) -> bytes:
    handles = metaindex.encode() + index.encode()
    padding = bytes(FOOTER_SIZE - 8 - len(handles))
    return handles + padding + coding.encode_fixed32(MAGIC & 0xFFFFFFFF) + coding.encode_fixed32(MAGIC >> 32)


def build_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """The table bytes for ``entries``, which must be sorted with unique keys."""
    builder = TableBuilder()
    for key, value in entries:
        builder.add(key, value)
    return builder.finish()


# ---------------------------------------------------------------------------- reading
class Table:
    """A parsed table held in memory; every read is bounds- and CRC-checked.

    ``name`` is the file the bytes came from; it appears in every error.
    """

    def __init__(self, data: bytes, name: str):
        self._data = data
        self.name = name
        metaindex, index = self._read_footer()
        self._read_block(metaindex, "metaindex block")  # TF never reads it; its CRC still catches damage
        entries = _parse_block(self._read_block(index, "index block"), self.name, "index block")
        self._index_keys = [key for key, _ in entries]
        self._handles = [self._decode_handle(value) for _, value in entries]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every entry in file order; raises if keys are not strictly increasing."""
        last: bytes | None = None
        for i, handle in enumerate(self._handles):
            for key, value in self._block_entries(i, handle):
                if last is not None and key <= last:
                    raise CorruptCheckpointError(f"{self.name}: keys out of order ({key!r} after {last!r})")
                last = key
                yield key, value

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, reading only the one data block that may hold it."""
        i = bisect.bisect_left(self._index_keys, key)
        if i == len(self._handles):
            return None
        for k, value in self._block_entries(i, self._handles[i]):
            if k == key:
                return value
        return None

    # -- helpers
    def _block_entries(self, i: int, handle: BlockHandle) -> list[tuple[bytes, bytes]]:
        what = f"data block {i}"
        return _parse_block(self._read_block(handle, what), self.name, what)

    def _read_footer(self) -> tuple[BlockHandle, BlockHandle]:
        if len(self._data) < FOOTER_SIZE:
            raise CorruptCheckpointError(
                f"{self.name}: not a checkpoint index (file is {len(self._data)} bytes, shorter than the footer)")
        footer = self._data[-FOOTER_SIZE:]
        if coding.decode_fixed64(footer, FOOTER_SIZE - 8) != MAGIC:
            raise CorruptCheckpointError(f"{self.name}: not a checkpoint index (bad table magic number)")
        try:
            metaindex, pos = BlockHandle.decode(footer, 0)
            index, pos = BlockHandle.decode(footer, pos)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{self.name}: bad footer block handle ({exc})") from None
        if pos > FOOTER_SIZE - 8:
            raise CorruptCheckpointError(f"{self.name}: footer block handles overrun the magic number")
        return metaindex, index

    def _decode_handle(self, value: bytes) -> BlockHandle:
        try:
            handle, _ = BlockHandle.decode(value)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{self.name}: bad block handle in index block ({exc})") from None
        return handle

    def _check_handle(self, handle: BlockHandle, what: str) -> None:
        limit = len(self._data) - FOOTER_SIZE
        if handle.offset + handle.size + TRAILER_SIZE > limit:
            raise CorruptCheckpointError(
                f"{self.name}: {what} at offset {handle.offset} size {handle.size} "
                f"extends beyond the file ({len(self._data)} bytes)")

    def _read_block(self, handle: BlockHandle, what: str) -> bytes:
        self._check_handle(handle, what)
        end = handle.offset + handle.size
        contents = self._data[handle.offset:end]
        type_byte = self._data[end:end + 1]
        stored = coding.decode_fixed32(self._data, end + 1)
        if crc.unmask(stored) != crc.extend(crc.crc32c(contents), type_byte):
            raise CRCMismatchError(f"{self.name}: checksum mismatch in {what} at offset {handle.offset}")
        if type_byte[0] == SNAPPY_COMPRESSION:
            raise CorruptCheckpointError(f"{self.name}: {what} is Snappy-compressed, which we do not read")
        if type_byte[0] != NO_COMPRESSION:
            raise CorruptCheckpointError(f"{self.name}: {what} has unknown block type {type_byte[0]}")
        return contents


def _parse_block(block: bytes, name: str, what: str) -> list[tuple[bytes, bytes]]:
    """Decode all entries of one block, checking every length against the block."""
    if len(block) < 4:
        raise CorruptCheckpointError(f"{name}: {what} is {len(block)} bytes, too short for a block")
    num_restarts = coding.decode_fixed32(block, len(block) - 4)
    if num_restarts > (len(block) - 4) // 4:
        raise CorruptCheckpointError(f"{name}: {what} declares {num_restarts} restart points, more than fit")
    limit = len(block) - 4 - 4 * num_restarts
    restarts = {coding.decode_fixed32(block, limit + 4 * i) for i in range(num_restarts)}
    try:
        return _decode_entries(block, limit, restarts)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{name}: malformed {what}: {exc}") from None


def _decode_entries(block: bytes, limit: int, restarts: set[int]) -> list[tuple[bytes, bytes]]:
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        start = pos
        shared, pos = coding.decode_varint32(block, pos)
        non_shared, pos = coding.decode_varint32(block, pos)
        value_len, pos = coding.decode_varint32(block, pos)
        if shared > len(key) or (start in restarts and shared != 0):
            raise ValueError(f"entry at {start} shares {shared} bytes with a {len(key)}-byte key")
        if pos + non_shared + value_len > limit:
            raise ValueError(f"entry at {start} runs past the end of the entries")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos:pos + value_len]))
        pos += value_len
    if pos != limit:
        raise ValueError("entries overrun the restart array")
    return entries

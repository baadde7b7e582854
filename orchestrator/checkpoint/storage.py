"""The one place that talks to fsspec.

Every checkpoint path is a local path or an fsspec URL (``memory://``, ``s3://``,
``gs://``, ``file://``). ``Storage`` wraps the filesystem behind a handful of verbs
the checkpoint code needs, so no other module imports fsspec and fault-injecting
filesystems can be swapped in by tests.

Atomicity: ``write_atomic`` makes a file appear whole or not at all. On filesystems
with an atomic rename (local disk, memory) it writes ``<path>.tmp-<hex>`` and renames;
on object stores a single PUT of the whole object is already atomic, so it uploads
directly. A failed write removes what it left behind and re-raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import posixpath
import stat
import threading
import uuid
from typing import Any, Iterator, Mapping, Sequence

import fsspec
from fsspec.core import url_to_fs
from orchestrator.errors import InvalidArgumentError

TEMP_MARKER = ".tmp-"
_DIR_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}
_OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


class Storage:
    """A filesystem plus the conventions checkpoints rely on.

    Paths given to methods are full paths in the form returned by ``resolve``
    (for URLs, the protocol is kept so messages show what the user typed).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, protocol: str = "", fsync: bool = True):
        self.fs = fs
        self.protocol = protocol
        self.fsync = fsync

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_path(
        cls, path: str, storage_options: Mapping[str, Any] | None = None, fsync: bool = True
    ) -> tuple["Storage", str]:
        """Return ``(storage, path)`` for a local path or URL.

        The returned path keeps the protocol for URLs (``memory://x/y``) and is
        absolute for local paths.
        """
        path = os.fspath(path)
        fs, _ = url_to_fs(path, **dict(storage_options or {}))
        protocol = path.split("://", 1)[0] if "://" in path else ""
        if protocol in ("", "file", "local"):
            local = path.split("://", 1)[1] if "://" in path else path
            return cls(fs, "", fsync), os.path.abspath(os.path.expanduser(local))
        return cls(fs, protocol, fsync), path.rstrip("/")

    @property
    def is_local(self) -> bool:
        return any(p in ("file", "local") for p in _protocols(self.fs))

    @property
    def has_atomic_rename(self) -> bool:
        """True where ``mv`` of one file is atomic (local disk, memory)."""
        return not any(p in _OBJECT_STORE_PROTOCOLS for p in _protocols(self.fs))

    # ------------------------------------------------------------------ paths
    def _strip(self, path: str) -> str:
        return self.fs._strip_protocol(path)

    def _unstrip(self, stripped: str) -> str:
        if not self.protocol:
            return stripped
        if stripped.startswith(self.protocol + "://"):
            return stripped
        return f"{self.protocol}://{stripped.lstrip('/')}"

    @staticmethod
    def join(*parts: str) -> str:
        return posixpath.join(*parts) if "://" in parts[0] else os.path.join(*parts)

    @staticmethod
    def dirname(path: str) -> str:
        if "://" in path:
            proto, rest = path.split("://", 1)
            return f"{proto}://{posixpath.dirname(rest)}"
        return os.path.dirname(path)

    @staticmethod
    def basename(path: str) -> str:
        return posixpath.basename(path.rstrip("/")) if "://" in path else os.path.basename(path)

    # ------------------------------------------------------------------ queries
    def exists(self, path: str) -> bool:
        return self.fs.exists(self._strip(path))

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(self._strip(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(self._strip(path)))

    def glob(self, pattern: str) -> list[str]:
        """Matching paths, sorted, in the same form as the pattern."""
        return sorted(self._unstrip(p) for p in self.fs.glob(self._strip(pattern)))

    def listdir(self, path: str) -> list[str]:
        """Full paths of the entries of a directory; empty if it does not exist."""
        try:
            names = self.fs.ls(self._strip(path), detail=False)
        except FileNotFoundError:
            return []
        return sorted(self._unstrip(n) for n in names)

    def modified(self, path: str) -> float | None:
        """Modification time as Unix seconds, where the filesystem reports one."""
        try:
            stamp = self.fs.modified(self._strip(path))
        except (NotImplementedError, FileNotFoundError, OSError):
            return None
        return stamp.timestamp()

    # ------------------------------------------------------------------ reads
    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(self._strip(path))

    def open_read(self, path: str) -> Any:
        """A binary file object for streaming reads, for a reader that must not hold a file's bytes whole."""
        return self.fs.open(self._strip(path), "rb")

    def read_ranges(self, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """The bytes of each ``(path, start, length)`` range (fewer only where a file is shorter).

        Async filesystems (s3, gcs) fetch the ranges concurrently.
        """
        wanted = [i for i, (_, _, length) in enumerate(ranges) if length > 0]
        out = [b""] * len(ranges)
        if wanted:
            paths = [self._strip(ranges[i][0]) for i in wanted]
            starts = [ranges[i][1] for i in wanted]
            ends = [ranges[i][1] + ranges[i][2] for i in wanted]
            for i, data in zip(wanted, self.fs.cat_ranges(paths, starts, ends, on_error="raise")):
                out[i] = data
        return out

    def open_local(self, path: str) -> "LocalFile":
        """Open a local file for reads at explicit offsets (``is_local`` storages only)."""
        if not self.is_local:
            raise InvalidArgumentError(f"{path}: open_local needs a local filesystem, not {self.protocol}://")
        return LocalFile(self._strip(path))

    # ------------------------------------------------------------------ writes
    def makedirs(self, path: str) -> None:
        self.fs.makedirs(self._strip(path), exist_ok=True)

    @contextlib.contextmanager
    def write_atomic(self, path: str) -> Iterator[Any]:
        """Open ``path`` for writing so that it appears whole or not at all.

        Yields a binary file object. On success the data is flushed (and fsync'd on
        local disk when ``fsync``) and moved into place; on any error the partial
        file is removed and the error re-raised.
        """
        parent = self.dirname(path)
        if parent and self.has_atomic_rename:
            self.makedirs(parent)
        target = path
        if self.has_atomic_rename:
            target = f"{path}{TEMP_MARKER}{uuid.uuid4().hex[:12]}"
        stripped = self._strip(target)
        f = self.fs.open(stripped, "wb")
        try:
            yield _EagerWriteback(f) if self.fsync and self.is_local else f
            self._sync(f)
            f.close()
            if target != path:
                self.rename(target, path)
                self.sync_dir(parent)  # the new name itself must survive a power loss
        except BaseException:
            self._discard(f, stripped if target != path else None)
            raise

    def _discard(self, f: Any, temp: str | None) -> None:
        """Drop a failed write: abort an object-store upload (never publish it), remove a temp file."""
        with contextlib.suppress(Exception):
            if temp is None and callable(getattr(f, "discard", None)):
                f.discard()  # e.g. s3fs aborts the multipart upload; the old object stays
                f.closed = True  # a discarded buffer must never be flushed by a later close()
            elif not f.closed:
                f.close()
        if temp is not None:
            with contextlib.suppress(Exception):
                if self.fs.exists(temp):
                    self.fs.rm_file(temp)

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.write_atomic(path) as f:
            f.write(data)

    def _sync(self, f: Any) -> None:
        """Make a written file durable; an error here fails the write (it must not claim durability).

        Local files are fsync'd; a filesystem whose file objects have their own ``fsync``
        (a test's fault-injecting one) gets that called. Object stores have nothing to
        sync: an upload is durable once it completed.
        """
        if not self.fsync:
            return
        if self.is_local:
            f.flush()
            os.fsync(f.fileno())
        elif callable(getattr(f, "fsync", None)):
            f.flush()
            f.fsync()

    def sync_dir(self, path: str) -> None:
        """fsync a local directory so renames in it survive a power loss.

        Filesystems that cannot sync a directory (EINVAL, ENOTSUP) are tolerated; an I/O
        error is not: the rename might not survive a crash, so the write fails.
        """
        if not (self.fsync and self.is_local):
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # e.g. a platform that cannot open directories
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _DIR_SYNC_UNSUPPORTED:
                raise
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        if self.is_local:
            os.replace(src, dst)  # atomic, overwrites, no directory copies
        else:
            self.fs.mv(self._strip(src), self._strip(dst))

    def rm(self, path: str, missing_ok: bool = True) -> None:
        try:
            self.fs.rm_file(self._strip(path))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir_tree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._strip(path), recursive=True)


WRITEBACK_BYTES = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


def _load_sync_file_range():
    """Linux's ``sync_file_range`` through ctypes (Python's os module lacks it), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux (Windows cannot even open "no library")
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


class _EagerWriteback:
    """A local file being written that will be fsync'd: start writing it to disk early.

    Left alone, the kernel holds a file's dirty pages until the closing fsync and only
    then writes them all, while the writer waits. Asking for writeback of each
    ``WRITEBACK_BYTES`` as soon as they are written lets the disk work while the caller
    produces the rest, so the final fsync finds little left to do. Durability is the
    same (the fsync still decides); only the waiting shrinks.
    """

    def __init__(self, f: Any):
        self._f = f
        self._written = 0
        self._started = 0  # bytes already handed to writeback
        self._fd = self._fileno(f) if _sync_file_range is not None else None

    @staticmethod
    def _fileno(f: Any) -> int | None:
        try:
            return f.fileno()
        except (AttributeError, OSError, ValueError):
            return None

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._written += memoryview(data).nbytes if n is None else n
        if self._fd is not None and self._written - self._started >= WRITEBACK_BYTES:
            self._start_writeback()
        return n

    def _start_writeback(self) -> None:
        self._f.flush()  # the file object may buffer; the kernel sees only what was flushed
        if _sync_file_range(self._fd, self._started, self._written - self._started, _SYNC_FILE_RANGE_WRITE) != 0:
            self._fd = None  # e.g. a filesystem that does not support it: plain fsync at the end
            return
        self._started = self._written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


_HAS_PREADV = hasattr(os, "preadv")


class LocalFile:
    """A local file held open and read at explicit offsets.

    ``pread`` keeps no shared file position, so threads may read one open file at
    once, and reads of consecutive ranges through one descriptor keep the kernel's
    readahead running ahead of the caller (a fresh ``open`` per range restarts it).
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._lock = threading.Lock()  # only for platforms without preadv
        try:
            info = os.fstat(self._fd)
            if stat.S_ISDIR(info.st_mode):  # opening a directory succeeds; reading it would not
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            self.size = info.st_size
        except OSError:
            os.close(self._fd)
            raise

    def readinto(self, offset: int, view: memoryview) -> int:
        """Fill ``view`` from ``offset``; return the bytes read (fewer only at end of file)."""
        wanted = len(view)
        filled = self._read_at(offset, view)
        while 0 < filled < wanted:  # rare: a signal or a short read mid-file
            n = self._read_at(offset + filled, view[filled:])
            if not n:
                break
            filled += n
        return filled

    def _read_at(self, offset: int, view: memoryview) -> int:
        if _HAS_PREADV:
            return os.preadv(self._fd, [view], offset)
        with self._lock:  # e.g. Windows: seek + read, one thread at a time
            os.lseek(self._fd, offset, os.SEEK_SET)
            data = os.read(self._fd, len(view))
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "LocalFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def storage_for(
    path: str, storage_options: Mapping[str, Any] | None = None, fsync: bool = True
) -> tuple[Storage, str]:
    """Shorthand for ``Storage.for_path``."""
    return Storage.for_path(path, storage_options, fsync)

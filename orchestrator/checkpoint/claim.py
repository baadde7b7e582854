"""A run claims its checkpoint directory: a write probe first, then a lock held for the run's life.

Why: a run whose saves all fail must stop before it starts, not train for hours and lose
everything; and two runs writing one directory overwrite each other's checkpoints.

* ``check_directory``: read-only checks ``validate`` can run (a local path that is a file).
* ``probe_writable``: writes, fsyncs, renames and removes a small file in the directory,
  the same operations a save makes, and names the cause when one fails (read-only
  filesystem, no permission, missing bucket, a file in the way).
* ``DirectoryLock``: one run owns a directory.

  - Local (and other filesystems with a working ``flock``): ``<dir>/.orchestrator.lock``
    held with ``fcntl.flock`` for the run's life. The kernel releases it when the process
    ends, however it ends (SIGKILL included), so a relaunch takes it at once.
  - Object stores (no locks): a lease object ``<dir>/.orchestrator.lock`` holding the
    owner, host, pid and a heartbeat the holder rewrites every ``lease_timeout_s / 4``.
    A lease whose heartbeat is older than ``lease_timeout_s`` is stale and taken over
    (at once when its holder ran on this host and that pid is gone). A newcomer that
    finds a lease waits, with a log line saying so: if the heartbeat moves, the holder is
    alive and the newcomer stops (``DirectoryInUseError``); if it does not move for
    ``lease_timeout_s``, the lease is taken over. Taking over writes the lease, waits, and
    reads it back, so of two runs taking over at once only the last writer proceeds.

  Either way a second run gets ``DirectoryInUseError`` naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from orchestrator.checkpoint.errors import CheckpointError
from orchestrator.checkpoint.storage import TEMP_MARKER, Storage
from orchestrator.errors import BadInputError

log = logging.getLogger(__name__)

LOCK_NAME = ".orchestrator.lock"
DEFAULT_LEASE_TIMEOUT_S = 60.0


class DirectoryNotWritableError(CheckpointError, BadInputError):
    """The checkpoint directory cannot be written (read-only, no permission, no bucket, a file)."""


class DirectoryInUseError(CheckpointError, BadInputError):
    """Another run holds the checkpoint directory."""


# ---------------------------------------------------------------------- checks
def check_directory(directory: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Read-only checks of a checkpoint directory (local paths only: nothing is contacted)."""
    storage, path = Storage.for_path(directory, storage_options)
    if not storage.is_local:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise DirectoryNotWritableError(f"checkpoint.dir {directory!r} is a file, not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DirectoryNotWritableError(f"checkpoint.dir {directory!r}: {parent} is a file, not a directory")


def probe_writable(directory: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write, make durable and remove a small file in ``directory``; raise naming the cause if any step fails."""
    check_directory(directory, storage_options)
    storage, path = Storage.for_path(directory, storage_options)
    if not storage.is_local and _is_file(storage, path):
        raise DirectoryNotWritableError(f"checkpoint.dir {directory!r} is an object (a file), not a directory")
    probe = Storage.join(path, f".write-probe{TEMP_MARKER}{uuid.uuid4().hex[:12]}")
    created = _missing_dirs(path) if storage.is_local else []
    try:
        if storage.has_atomic_rename:
            storage.makedirs(path)
        storage.write_bytes(probe, b"orchestrator write probe\n")
        storage.rm(probe)
        _remove_dirs(created)  # the lock creates them again; a rejected run leaves nothing behind
    except Exception as exc:  # any failure here is a directory a save could not write either
        raise DirectoryNotWritableError(
            f"checkpoint.dir {directory!r} is not writable: {_describe(exc)}; no checkpoint could be saved, "
            f"so the job does not start") from exc


def _is_file(storage: Storage, path: str) -> bool:
    try:
        return bool(storage.fs.isfile(storage._strip(path)))
    except Exception:  # unreachable or missing bucket: the write below says which
        return False


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"the bucket does not exist ({text})"
    return text


# ---------------------------------------------------------------------- the holder record
@dataclass
class Holder:
    """Who holds a directory; written into the lock file / lease object as JSON."""

    owner: str
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    @classmethod
    def me(cls, owner: str, now: float) -> "Holder":
        return cls(owner, socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(str(raw["owner"]), str(raw["host"]), int(raw["pid"]), str(raw["token"]),
                       float(raw["started"]), float(raw["heartbeat"]))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # Recursion: JSON nested too deep
            return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"{self.owner or 'a run'} (pid {self.pid} on host {self.host}, since {since})"

    def gone(self) -> bool:
        """True when this holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def _in_use(directory: str, holder: Holder | None) -> DirectoryInUseError:
    who = holder.describe() if holder is not None else "another process"
    return DirectoryInUseError(
        f"checkpoint.dir {directory!r} is in use by {who}: one run owns a checkpoint directory; "
        f"wait for that run to end, or use another checkpoint.dir")


# ---------------------------------------------------------------------- the lock
class DirectoryLock:
    """The lock of one checkpoint directory (see the module docstring); ``with`` or acquire/release."""

    def __init__(self, directory: str, storage_options: Mapping[str, Any] | None = None, owner: str = "",
                 lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.directory = directory
        self._storage, self._dir = Storage.for_path(directory, storage_options)
        self.path = Storage.join(self._dir, LOCK_NAME)
        self.owner = owner
        self.lease_timeout_s = float(lease_timeout_s)
        self._clock, self._sleep = clock, sleep
        self._fd: int | None = None
        self._created_dirs: list[str] = []  # made by this lock: removed again on release if still empty
        self._holder: Holder | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.lost = False

    @property
    def uses_flock(self) -> bool:
        return self._storage.is_local

    def acquire(self) -> None:
        if self.uses_flock:
            self._acquire_flock()
        else:
            self._acquire_lease()

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self._created_dirs and os.listdir(self._dir) == [LOCK_NAME]:  # a run that saved nothing
                os.unlink(self.path)  # before the unlock: a waiter re-checks the inode after locking
                _remove_dirs(self._created_dirs)
            os.close(fd)  # closing the descriptor releases the flock
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join(timeout=30)
            self._heartbeat = None
            with contextlib.suppress(Exception):
                current = self._read_lease()
                if current is not None and current.token == self._holder.token:
                    self._storage.rm(self.path)

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -------------------------------------------------------------- flock (local)
    def _open_lock_file(self) -> int:
        """The lock file, opened without following a symlink: the file is truncated and rewritten,
        and a link planted at its name must not make us write a file outside the directory."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(self.path, flags, 0o644)
        except IsADirectoryError:
            raise DirectoryNotWritableError(f"{self.path} is a directory, not the lock file; remove it") from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise DirectoryNotWritableError(
                f"{self.path} is a symlink; the lock file is written, so it is not followed: remove it") from None

    def _acquire_flock(self) -> None:
        import fcntl  # POSIX only

        self._created_dirs = _missing_dirs(self._dir)
        os.makedirs(self._dir, exist_ok=True)
        while True:
            fd = self._open_lock_file()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Holder.parse(_read_fd(fd))
                os.close(fd)
                raise _in_use(self.directory, holder) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file while releasing: lock the current one
        self._fd = fd
        self._holder = Holder.me(self.owner, self._clock())
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._holder.to_bytes(), 0)

    # -------------------------------------------------------------- lease (object stores)
    @property
    def heartbeat_s(self) -> float:
        return self.lease_timeout_s / 4

    def _read_lease(self) -> Holder | None:
        try:
            return Holder.parse(self._storage.read_bytes(self.path))
        except FileNotFoundError:
            return None

    def _acquire_lease(self) -> None:
        while True:
            current = self._read_lease()
            if current is not None and not current.gone():
                self._wait_until_stale(current)
            if self._try_take():
                break
        self._heartbeat = threading.Thread(target=self._beat, name="checkpoint-lease", daemon=True)
        self._heartbeat.start()

    def _wait_until_stale(self, seen: Holder) -> None:
        """Return once ``seen``'s lease is stale; raise if its holder shows it is alive."""
        age = self._clock() - seen.heartbeat
        if age < self.lease_timeout_s:
            log.warning("checkpoint.dir %s is leased by %s, last heartbeat %.0f s ago: waiting for the lease "
                        "to expire (checkpoint.lease_timeout_s=%g) or its holder to show it is alive",
                        self.directory, seen.describe(), age, self.lease_timeout_s)
        while self._clock() - seen.heartbeat < self.lease_timeout_s:
            self._sleep(min(1.0, self.heartbeat_s / 2))
            now = self._read_lease()
            if now is None:
                return
            if now.token != seen.token or now.heartbeat != seen.heartbeat:
                raise _in_use(self.directory, now)
        log.warning("checkpoint.dir %s: the lease of %s is stale (no heartbeat for %.0f s); taking it over",
                    self.directory, seen.describe(), self._clock() - seen.heartbeat)

    def _try_take(self) -> bool:
        mine = Holder.me(self.owner, self._clock())
        self._storage.write_bytes(self.path, mine.to_bytes())
        self._sleep(min(2.0, self.heartbeat_s / 2))  # a simultaneous taker's write lands meanwhile
        now = self._read_lease()
        if now is None or now.token != mine.token:
            return False
        self._holder = mine
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self._read_lease()
                if current is None or current.token != self._holder.token:
                    self.lost = True
                    log.error("checkpoint.dir %s: this run's lease was taken over by %s", self.directory,
                              current.describe() if current else "nobody (it was deleted)")
                    return
                self._holder.heartbeat = self._clock()
                self._storage.write_bytes(self.path, self._holder.to_bytes())
            except Exception as exc:  # storage trouble: keep trying until the lease times out
                log.warning("checkpoint.dir %s: lease heartbeat failed: %s", self.directory, exc)


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        path = parent if parent != path else ""
    return missing


def _remove_dirs(deepest_first: list[str]) -> None:
    for path in deepest_first:
        try:
            os.rmdir(path)
        except OSError:
            return  # not empty (someone else's files): leave it and its parents


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_fd(fd: int) -> bytes:
    with contextlib.suppress(OSError):
        return os.pread(fd, 4096, 0)
    return b""

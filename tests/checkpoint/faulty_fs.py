"""A fault-injecting fsspec filesystem for save-failure tests: ``faulty://``.

An in-memory filesystem (its own store, separate from ``memory://``) whose
operations consult a ``FaultPlan``: fail the N-th write to files matching a
pattern (e.g. shard k's data file) with ENOSPC / EACCES / a network error, write
only part of the bytes while reporting success (a silent short write), refuse to
open a file, fail a rename, or fail the ``fsync`` that makes a written file durable
(``Storage`` calls a file object's own ``fsync`` where it has one, as it calls
``os.fsync`` on local disk). Faults are real exceptions raised inside the
filesystem calls the checkpoint code makes; nothing in the code under test is
patched.

Usage::

    with injected(FaultPlan().fail_write(r"\\.data-00001-of-", errno.ENOSPC)) as plan:
        ...  # save to "faulty://dir/model.ckpt"
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

PROTOCOL = "faulty"


def os_error(code: int) -> Callable[[str], BaseException]:
    """A factory of ``OSError``s with ``code`` (ENOSPC, EACCES -> PermissionError, ...)."""
    def make(path: str) -> BaseException:
        cls = PermissionError if code in (errno.EACCES, errno.EPERM) else OSError
        return cls(code, os.strerror(code), path)
    return make


def network_error(path: str) -> BaseException:
    return ConnectionResetError(errno.ECONNRESET, "connection reset by peer (injected)", path)


@dataclass
class Rule:
    op: str  # "open" | "write" | "short" | "rename" | "fsync"
    pattern: re.Pattern
    nth: int  # fire on the nth matching call (1-based), then every later one if sticky
    error: Callable[[str], BaseException] | None
    sticky: bool = False
    calls: int = 0
    fired: int = 0

    def hit(self, path: str) -> bool:
        if not self.pattern.search(path):
            return False
        self.calls += 1
        fire = self.calls == self.nth or (self.sticky and self.calls > self.nth)
        self.fired += fire
        return fire


@dataclass
class FaultPlan:
    """Rules to apply, checked in order; thread safe (shards write in parallel)."""

    rules: list[Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _add(self, op, pattern, nth, error, sticky) -> "FaultPlan":
        self.rules.append(Rule(op, re.compile(pattern), nth, error, sticky))
        return self

    def fail_write(self, pattern: str, code: int = errno.ENOSPC, nth: int = 1, sticky: bool = False):
        return self._add("write", pattern, nth, os_error(code), sticky)

    def fail_write_with(self, pattern: str, error: Callable[[str], BaseException], nth: int = 1):
        return self._add("write", pattern, nth, error, False)

    def short_write(self, pattern: str, nth: int = 1):
        return self._add("short", pattern, nth, None, False)

    def fail_open(self, pattern: str, code: int = errno.EACCES):
        return self._add("open", pattern, 1, os_error(code), True)

    def fail_rename(self, pattern: str, code: int = errno.EIO, nth: int = 1):
        return self._add("rename", pattern, nth, os_error(code), False)

    def fail_fsync(self, pattern: str, code: int = errno.EIO, nth: int = 1, sticky: bool = False):
        """The data reached the page cache but not the disk: fsync reports EIO (or ENOSPC...)."""
        return self._add("fsync", pattern, nth, os_error(code), sticky)

    def fire(self, op: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.op == op and rule.hit(path):
                    return rule
        return None

    def raise_if(self, op: str, path: str) -> None:
        rule = self.fire(op, path)
        if rule is not None and rule.error is not None:
            raise rule.error(path)

    @property
    def fired(self) -> int:
        return sum(r.fired for r in self.rules)


class FaultyFile(MemoryFile):
    """A memory file whose writes consult the plan."""

    def write(self, data) -> int:
        plan = FaultyFileSystem.plan
        view = memoryview(data).cast("B")
        plan.raise_if("write", self.path)
        if plan.fire("short", self.path) is not None:
            super().write(view[: len(view) // 2])
            return len(view)  # lies, like a lost tail on a flaky mount
        return super().write(view)

    def fsync(self) -> None:
        FaultyFileSystem.plan.raise_if("fsync", self.path)


class FaultyFileSystem(MemoryFileSystem):
    """``faulty://``: an in-memory filesystem with injected faults."""

    protocol = PROTOCOL
    store: dict = {}
    pseudo_dirs = [""]
    plan: FaultPlan = FaultPlan()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3:]
        return "/" + path.strip("/") if path.strip("/") else ""

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if mode in ("wb", "xb", "w+b", "x+b"):
            self.plan.raise_if("open", path)
            f = FaultyFile(self, path)
            f.commit()
            return f
        return super()._open(path, mode, **kwargs)

    def mv(self, path1, path2, **kwargs):
        self.plan.raise_if("rename", self._strip_protocol(path1))
        return super().mv(path1, path2, **kwargs)

    @classmethod
    def reset(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.plan = FaultPlan()


fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


@contextlib.contextmanager
def injected(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Apply ``plan`` to every ``faulty://`` access inside the block."""
    previous, FaultyFileSystem.plan = FaultyFileSystem.plan, plan
    try:
        yield plan
    finally:
        FaultyFileSystem.plan = previous


def files(root: str) -> list[str]:
    """Every file under ``root`` (a ``faulty://`` URL), as ``faulty://`` URLs, sorted."""
    fs = fsspec.filesystem(PROTOCOL)
    stripped = fs._strip_protocol(root)
    return sorted(f"{PROTOCOL}:/{p}" for p in fs.store if p.startswith(stripped + "/"))

"""A job's start-up, before Ray: its checkpoint directory claimed, and signals that arrive meanwhile.

``claim`` runs the checks that need no Ray (a ``resume:`` path holds a committed checkpoint,
the checkpoint directory takes a probe write) and holds the directory's lock for the run
(``checkpoint.claim``), so bad input stops in a second, with nothing written. This module
imports neither Ray nor the runtime, so a rejected job never pays for them.

Signals that arrive while a job starts are recorded, then handed to the preemption watcher.

Until the supervisor's ``PreemptionWatcher`` is installed, Python's defaults would turn a
SIGINT into a ``KeyboardInterrupt`` traceback wherever the driver happens to be, and a
SIGTERM into an immediate exit that leaves a half-started Ray's processes orphaned.
``orchestrator train`` calls ``install()`` first thing, so a signal is only recorded:
``run_job`` does not start Ray if one came before, and once the supervisor exists hands
it over (``hand_over``), so the job stops the way a preemption does (nothing trained is
lost, exit 3) and Ray is shut down cleanly. The watcher installs its own handlers over
these while it runs and puts these back when it closes, so a signal during shut-down is
recorded too, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.RLock()  # reentrant: the handler runs in the main thread, which may hold it
_received: str | None = None
_forward: Callable[[str], None] | None = None
_previous: dict[int, object] = {}


def install() -> None:
    """Record SIGINT/SIGTERM instead of dying (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        if signum not in _previous:
            _previous[signum] = signal.signal(signum, _on_signal)


def take_back() -> None:
    """Install the handlers again where a library replaced them (``ray.init`` sets its own SIGTERM handler)."""
    if threading.current_thread() is threading.main_thread():
        for signum in _previous:
            signal.signal(signum, _on_signal)


def record(reason: str) -> None:
    """Record a signal that reached the driver through someone else's handler."""
    global _received
    with _lock:
        _received = _received or reason


def uninstall() -> None:
    """Restore the handlers ``install`` replaced and forget what was recorded."""
    global _received, _forward
    for signum, previous in _previous.items():
        signal.signal(signum, previous)
    _previous.clear()
    with _lock:
        _received, _forward = None, None


def received() -> str | None:
    """What was received so far (e.g. ``"SIGTERM received by the driver (pid 12)"``), or None."""
    return _received


def hand_over(request: Callable[[str], None]) -> None:
    """From now on a recorded signal calls ``request(reason)``; one already received does at once."""
    global _forward
    with _lock:
        _forward = request
        pending = _received
    if pending is not None:
        request(pending)


def _on_signal(signum, frame) -> None:
    """Record (and forward) only: no logging here, a handler may interrupt the main thread mid-write."""
    global _received
    reason = f"{signal.Signals(signum).name} received by the driver (pid {os.getpid()})"
    with _lock:
        _received = _received or reason
        forward = _forward
    if forward is not None:
        forward(reason)


_claimed: dict[str, tuple[Any, int]] = {}  # lock path -> (lock, nesting depth)
_claim_lock = threading.Lock()


@contextlib.contextmanager
def claim(config) -> Iterator[None]:
    """Check the job's resume target, probe and lock its checkpoint directory for the block.

    Raises (bad input, exit 2): ``RestoreError`` for a ``resume:`` path without a committed
    checkpoint, ``DirectoryNotWritableError``, ``DirectoryInUseError`` naming the other run.
    Nested claims of one directory in one process share the lock (the CLI claims before it
    writes the run directory, then ``run_job`` claims again).
    """
    from orchestrator.checkpoint.claim import DirectoryLock, probe_writable
    from orchestrator.cluster import recipe

    recipe.resume_target(config)
    options = recipe.checkpoint_options(config)
    lock = DirectoryLock(config.checkpoint.dir, options, owner=f"run {config.name!r} (run_dir {config.run_dir})",
                         lease_timeout_s=config.checkpoint.lease_timeout_s)
    with _claim_lock:
        held = _claimed.get(lock.path)
        if held is not None:
            _claimed[lock.path] = (held[0], held[1] + 1)
    if held is None:
        probe_writable(config.checkpoint.dir, options)
        lock.acquire()
        with _claim_lock:
            _claimed[lock.path] = (lock, 1)
    try:
        yield
    finally:
        with _claim_lock:
            owner, depth = _claimed.pop(lock.path)
            if depth > 1:
                _claimed[lock.path] = (owner, depth - 1)
        if depth == 1:
            owner.release()


def stopped_before_start(config) -> "JobResult":
    """The result of a job stopped (SIGINT/SIGTERM) before it trained: its latest checkpoint is the resume point."""
    from orchestrator.checkpoint import commit
    from orchestrator.cluster import recipe
    from orchestrator.cluster.coordinator import JobResult

    manager = recipe.checkpoint_manager(config)
    latest = manager.latest_checkpoint
    log.warning("stopped during start-up (%s); nothing was trained, %s", received(),
                f"the resume point is {latest}" if latest else "no checkpoint exists yet")
    return JobResult(steps_completed=(commit.step_of(latest) or 0) if latest else 0, final_metrics={},
                     checkpoints=list(manager.checkpoints), preempted=True, last_checkpoint=latest)

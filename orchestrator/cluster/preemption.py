"""Preemption watcher: tells the training loop that it should checkpoint and stop.

Three sources, all turned into one flag that the coordinator polls between steps:

1. SIGTERM / SIGINT delivered to the driver (schedulers send SIGTERM before killing).
   The handler only sets the flag; the previous handlers come back on ``close()``.
   A second SIGINT raises KeyboardInterrupt, so an impatient Ctrl-C still works.
2. A preemption notice file (``fault_tolerance.preemption_notice_file``): schedulers
   that announce preemption by creating a file. Its existence is the notice.
3. A Ray node drain (autoscaler preemption, ``ray drain-node``) of a node that hosts
   one of our workers. Ray 2.60 exposes the draining nodes through the GCS
   (``ray._private.state.state.get_draining_nodes()``, a developer API returning
   ``{node_id_hex: deadline_ms}``); if that query is unavailable, this source is off.

File and drain checks are rate-limited to ``poll_interval_s``; the flag is checked
on every call.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Iterable

from orchestrator.cluster.scaling_policy import draining_node_ids

logger = logging.getLogger(__name__)

NodeIdsFn = Callable[[], Iterable[str]]


class PreemptionWatcher:
    """``requested()`` turns True once a preemption was noticed; ``reason`` says which."""

    def __init__(self, notice_file: str | None = None,
                 worker_node_ids: NodeIdsFn | None = None,
                 poll_interval_s: float = 1.0,
                 signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
                 clock: Callable[[], float] = time.monotonic):
        self.notice_file = notice_file
        self.worker_node_ids = worker_node_ids
        self.poll_interval_s = poll_interval_s
        self._signals = tuple(signals)
        self._clock = clock
        self._previous: dict[int, object] = {}
        self._reason: str | None = None
        self._requested_at: float | None = None
        self._next_poll = float("-inf")
        # reentrant: the signal handler runs in the main thread, possibly while it holds the lock
        self._lock = threading.RLock()

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def requested_at(self) -> float | None:
        """``clock()`` time of the first notice, or None."""
        return self._requested_at

    def request(self, reason: str) -> None:
        """Marks preemption as requested (first reason wins)."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
                self._requested_at = self._clock()
                logger.warning("preemption requested: %s", reason)

    def requested(self) -> bool:
        """True once any source gave notice; polls the file and Ray at most every interval."""
        if self._reason is None and self._clock() >= self._next_poll:
            self._next_poll = self._clock() + self.poll_interval_s
            self._poll_sources()
        return self._reason is not None

    def install(self) -> "PreemptionWatcher":
        """Installs the signal handlers (main thread only; elsewhere logs and skips)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption watcher: not in the main thread, signals not handled")
            return self
        for signum in self._signals:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def close(self) -> None:
        """Restores the signal handlers that were there before ``install()``."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name} while checkpointing for preemption")
        self.request(f"{name} received by the driver (pid {os.getpid()})")

    def _poll_sources(self) -> None:
        if self.notice_file and os.path.exists(self.notice_file):
            self.request(f"preemption notice file {self.notice_file} exists")
            return
        if self.worker_node_ids is None:
            return
        draining = draining_node_ids()
        ours = draining & set(self.worker_node_ids()) if draining else set()
        if ours:
            self.request(f"Ray is draining node(s) {', '.join(sorted(ours))} hosting workers")

"""Preemption watcher: tells the training loop that it should checkpoint and stop, and by when.

Every source becomes one ``Notice`` (``notices.Notice``: reason and deadline); the
first one wins and the coordinator polls the flag between steps:

1. SIGTERM / SIGINT delivered to the driver (schedulers send SIGTERM before killing).
   The handler only records the notice; the previous handlers come back on ``close()``.
   A second SIGINT raises KeyboardInterrupt, so an impatient Ctrl-C still works, until
   ``settle()`` says the emergency checkpoint is committed (then it is ignored). With
   ``preemption_notices.kubernetes`` the deadline is ``kubernetes_grace_period_s`` (the
   pod's ``terminationGracePeriodSeconds``) after the SIGTERM, else ``grace_period_s``.
2. A preemption notice file (``fault_tolerance.preemption_notice_file``): schedulers
   that announce preemption by creating a file. Its existence is the notice.
3. A Ray node drain (autoscaler preemption, ``ray drain-node``) of a node that hosts
   one of our workers, with the drain's deadline. Ray 2.60 exposes the draining nodes
   through the GCS (``ray._private.state.state.get_draining_nodes()``, a developer API
   returning ``{node_id_hex: deadline_ms}``); if that query is unavailable, this source
   is off.
4. Cloud metadata services (``notices.GceMetadata``, ``AwsSpot``,
   ``AzureScheduledEvents``), each opt-in: asked from a background thread every
   ``poll_interval_s``, so a slow or absent metadata server never stalls a step.

File and drain checks are rate-limited to ``poll_interval_s``; the flag is checked
on every call. A notice without a deadline of its own (a plain SIGTERM, the notice
file) gets ``grace_period_s`` from the moment it was seen.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Iterable, Sequence

from orchestrator.cluster import notices as notices_lib
from orchestrator.cluster.notices import Notice, NoticeSource, NoticeSourceError
from orchestrator.cluster.scaling_policy import draining_nodes

logger = logging.getLogger(__name__)

NodeIdsFn = Callable[[], Iterable[str]]
DEFAULT_GRACE_S = 30.0


class PreemptionWatcher:
    """``requested()`` turns True once a preemption was noticed; ``notice`` says which and by when."""

    def __init__(self, notice_file: str | None = None,
                 worker_node_ids: NodeIdsFn | None = None,
                 poll_interval_s: float = 1.0,
                 signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
                 clock: Callable[[], float] = time.monotonic,
                 sources: Sequence[NoticeSource] = (),
                 grace_s: float = DEFAULT_GRACE_S,
                 sigterm_grace_s: float | None = None):
        """``grace_s``: deadline of a notice that brings none; ``sigterm_grace_s``: the
        deadline after a SIGTERM when the scheduler says how long it waits (Kubernetes)."""
        self.notice_file = notice_file
        self.worker_node_ids = worker_node_ids
        self.poll_interval_s = poll_interval_s
        self.sources = list(sources)
        self.grace_s = float(grace_s)
        self.sigterm_grace_s = sigterm_grace_s
        self._signals = tuple(signals)
        self._clock = clock
        self._previous: dict[int, object] = {}
        self._notice: Notice | None = None
        self._requested_at: float | None = None
        self._next_poll = float("-inf")
        self._poller: _SourcePoller | None = None
        self._settled = False
        # reentrant: the signal handler runs in the main thread, possibly while it holds the lock
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, fault_tolerance, worker_node_ids: NodeIdsFn | None = None) -> "PreemptionWatcher":
        """The watcher a job's ``fault_tolerance`` section asks for."""
        opts = fault_tolerance.preemption_notices
        return cls(notice_file=fault_tolerance.preemption_notice_file,
                   worker_node_ids=worker_node_ids if opts.ray_drain else None,
                   poll_interval_s=opts.poll_interval_s,
                   sources=notices_lib.cloud_sources(opts),
                   grace_s=fault_tolerance.grace_period_s,
                   sigterm_grace_s=opts.kubernetes_grace_period_s if opts.kubernetes else None)

    @property
    def notice(self) -> Notice | None:
        return self._notice

    @property
    def reason(self) -> str | None:
        return self._notice.reason if self._notice else None

    @property
    def requested_at(self) -> float | None:
        """``clock()`` time of the first notice, or None."""
        return self._requested_at

    def deadline(self) -> float | None:
        """``clock()`` time by which the emergency checkpoint must be done (None: no notice yet)."""
        notice = self._notice
        if notice is None:
            return None
        return notice.deadline if notice.deadline is not None else self._requested_at + self.grace_s

    def request(self, reason: str, deadline: float | None = None, source: str = "request") -> None:
        """Marks preemption as requested (first notice wins)."""
        self.accept(Notice(source, reason, deadline))

    def accept(self, notice: Notice, at: float | None = None) -> None:
        """Records ``notice`` (seen at ``clock()`` time ``at``, default now) unless one came first."""
        with self._lock:
            if self._notice is None:
                self._notice = notice
                self._requested_at = self._clock() if at is None else at
                left = notice.seconds_left(self._requested_at)
                by = f"; deadline in {left:.1f} s" if left is not None else ""
                logger.warning("preemption requested: %s%s", notice.reason, by)

    def requested(self) -> bool:
        """True once any source gave notice; polls the file and Ray at most every interval."""
        if self._notice is None and self._clock() >= self._next_poll:
            self._next_poll = self._clock() + self.poll_interval_s
            self._poll_local_sources()
        return self._notice is not None

    def install(self) -> "PreemptionWatcher":
        """Installs the signal handlers (main thread only; elsewhere logs and skips) and starts
        polling the cloud sources."""
        if self.sources and self._poller is None:
            self._poller = _SourcePoller(self.sources, self.poll_interval_s, self.accept)
            self._poller.start()
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption watcher: not in the main thread, signals not handled")
            return self
        for signum in self._signals:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def close(self) -> None:
        """Stops polling; restores the signal handlers that were there before ``install()``."""
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()

    def dismiss(self) -> None:
        """The notice was handled without stopping (the drained nodes' workers moved): watch again."""
        with self._lock:
            self._notice, self._requested_at = None, None
            self._next_poll = float("-inf")

    def settle(self) -> None:
        """The emergency checkpoint is committed: later signals are ignored, never raised."""
        self._settled = True

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._settled:  # nothing left to abort (no logging here: a handler may interrupt a log write)
            return
        if self._notice is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name} while checkpointing for preemption")
        now = self._clock()
        if signum == signal.SIGTERM and self.sigterm_grace_s is not None:
            self.accept(Notice("kubernetes", f"SIGTERM received by the driver (pid {os.getpid()}); Kubernetes "
                                             f"kills the pod {self.sigterm_grace_s:g} s later",
                               now + self.sigterm_grace_s), now)
            return
        self.accept(Notice("signal", f"{name} received by the driver (pid {os.getpid()})", now + self.grace_s), now)

    def _poll_local_sources(self) -> None:
        if self.notice_file and os.path.exists(self.notice_file):
            self.request(f"preemption notice file {self.notice_file} exists", source="file")
            return
        if self.worker_node_ids is None:
            return
        draining = draining_nodes()
        ours = sorted(set(draining) & set(self.worker_node_ids())) if draining else []
        if ours:
            self.accept(self._drain_notice(ours, draining))

    def _drain_notice(self, ours: list[str], draining: dict[str, int]) -> Notice:
        stamps = [draining[n] for n in ours if draining[n] > 0]
        deadline = (notices_lib.wall_to_monotonic(min(stamps) / 1000.0, self._clock, time.time)
                    if stamps else None)
        return Notice("ray_drain", f"Ray is draining node(s) {', '.join(ours)} hosting workers", deadline,
                      frozenset(ours))


class _SourcePoller:
    """A daemon thread asking each cloud source every ``interval_s`` until one gives notice."""

    def __init__(self, sources: Sequence[NoticeSource], interval_s: float, on_notice: Callable[[Notice], None]):
        self.sources = list(sources)
        self.interval_s = interval_s
        self.on_notice = on_notice
        self._stop = threading.Event()
        self._failing: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="preemption-notices", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=notices_lib.REQUEST_TIMEOUT_S * 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            for source in self.sources:
                notice = self._ask(source)
                if notice is not None:
                    self.on_notice(notice)
                    return
            self._stop.wait(self.interval_s)

    def _ask(self, source: NoticeSource) -> Notice | None:
        try:
            notice = source.poll()
        except NoticeSourceError as exc:
            if source.name not in self._failing:  # once per outage, not once per poll
                self._failing.add(source.name)
                logger.warning("preemption notices (%s): cannot tell: %s; asking again every %g s",
                               source.name, exc, self.interval_s)
            return None
        if source.name in self._failing:
            self._failing.discard(source.name)
            logger.info("preemption notices (%s): metadata service answers again", source.name)
        return notice

"""The hooks the runtime calls while a job runs.

``Reporter`` turns runtime events into what the operator sees (``ProgressDisplay``),
TensorBoard scalars (``EventFileWriter`` under ``<run_dir>/tensorboard``), Ray metrics
for failures and recoveries (``RayRecoveryMetrics``, when Ray runs) and, on ``close``,
the ``RunSummary`` (printed and written to ``<run_dir>/summary.json``).
Every line the operator sees (progress every ``log_every_steps``, eval, checkpoint,
failure, recovery, the summary) also goes to the ``orchestrator.run`` logger, which the
CLI writes to ``<run_dir>/train.log`` but not to the console (the display already did).

NOTE: hooks may be called from the coordinator loop and from background save threads;
every hook takes the reporter's lock.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, TextIO

from orchestrator.config import JobConfig, redact
from orchestrator.monitor.events import EventFileWriter
from orchestrator.monitor.progress import ProgressDisplay, ProgressState, RunSummary, format_progress, format_summary
from orchestrator.monitor.ray_metrics import RayRecoveryMetrics
from orchestrator.monitor.recovery import PHASES, RecoveryRecord
from orchestrator.units import human_bytes

logger = logging.getLogger(__name__)
RUN_LOGGER = "orchestrator.run"  # the display's lines, for train.log (the CLI keeps them off the console)
run_log = logging.getLogger(RUN_LOGGER)

TENSORBOARD_SUBDIR = "tensorboard"
SUMMARY_FILE = "summary.json"


def _dropped_after_close(hook: Callable[..., None]) -> Callable[..., None]:
    """Run the hook under the reporter's lock, unless the run's summary is already out.

    A late event (e.g. a save that commits while the job shuts down) is dropped: the
    event file is closed and the summary printed.
    """
    @functools.wraps(hook)
    def guarded(self: "Reporter", *args: Any, **kwargs: Any) -> None:
        with self._lock:
            if self._summary is None:
                hook(self, *args, **kwargs)
    return guarded


class Reporter:
    """Receives ``on_step``/``on_eval``/``on_checkpoint``/``on_failure``/``on_recovery``; ``close`` -> summary."""

    def __init__(self, run_dir: str, *, name: str = "", total_steps: int, global_batch_size: int,
                 log_every_steps: int = 10, progress: str = "auto", tensorboard: bool = True,
                 stream: TextIO | None = None, clock=time.monotonic):
        self.run_dir = run_dir
        self.name = name or os.path.basename(os.path.normpath(run_dir))
        self.global_batch_size = global_batch_size
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._state = ProgressState(total_steps=total_steps)
        self._display = ProgressDisplay(stream or sys.stdout, progress, log_every_steps, clock)
        self._log_every_steps = max(1, log_every_steps)
        self._events = EventFileWriter(os.path.join(run_dir, TENSORBOARD_SUBDIR)) if tensorboard else None
        self._last_step: tuple[int, float] | None = None
        self._metrics: dict[str, float] = {}
        self._failures = 0
        self._recoveries: list[RecoveryRecord] = []
        self._ray_metrics = RayRecoveryMetrics(self.name)
        self._summary: RunSummary | None = None

    @classmethod
    def from_config(cls, config: JobConfig, stream: TextIO | None = None, clock=time.monotonic) -> "Reporter":
        return cls(config.run_dir, name=config.name, total_steps=config.train.steps,
                   global_batch_size=config.data.global_batch_size,
                   log_every_steps=config.train.log_every_steps, progress=config.logging.progress.value,
                   tensorboard=config.logging.tensorboard, stream=stream, clock=clock)

    @property
    def events_path(self) -> str | None:
        return self._events.path if self._events else None

    # ------------------------------------------------------------------ hooks
    @_dropped_after_close
    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """After global step ``step``; ``metrics`` usually holds loss and accuracy."""
        scalars = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        scalars.update(self._timing(step, scalars))
        self._metrics.update({k: v for k, v in scalars.items() if k in ("loss", "accuracy")})
        self._state.step = step
        self._state.loss = scalars.get("loss", self._state.loss)
        self._state.accuracy = scalars.get("accuracy", self._state.accuracy)
        self._state.examples_per_sec = scalars.get("examples_per_sec", self._state.examples_per_sec)
        self._write_scalars(step, scalars)
        self._display.update(self._state)
        if step % self._log_every_steps == 0 or step >= self._state.total_steps:
            run_log.info("%s", format_progress(self._state))

    @_dropped_after_close
    def on_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Held-out metrics at ``step``: TensorBoard ``eval/<name>`` and one line."""
        scalars = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        self._metrics.update({f"eval_{k}": v for k, v in scalars.items()})
        self._write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
        text = ", ".join(f"{k} {v:.4f}" for k, v in sorted(scalars.items()))
        self._say(f"eval at step {step}: {text}")

    @_dropped_after_close
    def on_checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        """A checkpoint of ``step`` was committed after ``seconds`` of writing ``nbytes``."""
        self._state.last_checkpoint_step = step
        self._state.last_checkpoint_secs = float(seconds)
        self._write_scalars(step, {"checkpoint_save_time": seconds, "checkpoint_bytes": nbytes})
        self._say(f"checkpoint at step {step} saved in {seconds:.2f} s ({human_bytes(nbytes)})")

    @_dropped_after_close
    def on_failure(self, cause: Any, kind: str = "worker_error") -> None:
        """A worker or step failed; ``cause`` is an exception or a message."""
        self._failures += 1
        self._ray_metrics.failure(kind)
        self._say(redact(f"failure #{self._failures}: {cause}"))

    @_dropped_after_close
    def on_recovery(self, record: RecoveryRecord) -> None:
        """Training resumed after the last failure; ``record`` times each phase."""
        self._recoveries.append(record)
        step = self._state.step
        self._write_scalars(step, {f"recovery/{p}": getattr(record, p) for p in PHASES}
                            | {"recovery/total_s": record.total_s, "recovery/steps_lost": record.steps_lost})
        self._ray_metrics.recovery(record)
        self._say(f"recovered in {record.describe()}; training continues")

    # ------------------------------------------------------------------ end
    def close(self, result: Any = None, status: str | None = None, error: str | None = None) -> RunSummary:
        """Finish the display, close event files, print and write the summary (idempotent).

        ``error``: why the run failed and what was lost, for the summary.
        """
        with self._lock:
            if self._summary is None:
                self._display.finish()
                if self._events:
                    self._events.close()
                self._summary = self._build_summary(result, status, error)
                self._write_summary(self._summary)
                run_log.info("%s", format_summary(self._summary))
                self._display.stream.write(format_summary(self._summary) + "\n")
                self._display.stream.flush()
            return self._summary

    # ------------------------------------------------------------------ helpers
    def _say(self, text: str) -> None:
        """An event line: on the display and in the run log."""
        self._display.message(text)
        run_log.info("%s", text)

    def _timing(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
        """step_time and examples_per_sec from the time between two reported steps."""
        now = self._clock()
        last, self._last_step = self._last_step, (step, now)
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        per_step = (now - last[1]) / (step - last[0])
        out = {"examples_per_sec": self.global_batch_size / per_step, "step_time": per_step}
        return {k: v for k, v in out.items() if k not in scalars}

    def _write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._events and scalars:
            self._events.add_scalars(step, scalars)

    def _build_summary(self, result: Any, status: str | None, error: str | None = None) -> RunSummary:
        preempted = bool(getattr(result, "preempted", False))
        status = status or ("preempted" if preempted else "completed" if result is not None else "failed")
        metrics = dict(getattr(result, "final_metrics", None) or self._metrics)
        return RunSummary(
            name=self.name, status=status,
            steps_completed=int(getattr(result, "steps_completed", self._state.step)),
            total_steps=self._state.total_steps, wall_time_s=self._clock() - self._start,
            final_metrics={k: float(v) for k, v in metrics.items() if _is_number(v)},
            checkpoints_kept=[str(p) for p in (getattr(result, "checkpoints", None) or [])],
            last_checkpoint=getattr(result, "last_checkpoint", None),
            failures=self._failures,
            failures_recovered=int(getattr(result, "failures_recovered", len(self._recoveries))),
            recovery_time_s=sum(r.total_s for r in self._recoveries),
            recoveries=[r.to_dict() for r in self._recoveries],
            emergency_tier=getattr(result, "emergency_tier", None) if preempted else None,
            error=redact(error) if error else None,
        )

    def _write_summary(self, summary: RunSummary) -> None:
        path = os.path.join(self.run_dir, SUMMARY_FILE)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(redact(json.dumps(summary.to_dict(), indent=2)) + "\n")
        except OSError as exc:
            logger.warning("could not write the run summary %s: %s", path, exc)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bytes))

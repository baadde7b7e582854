"""What the operator sees while a job runs and when it ends.

On a terminal: one line redrawn in place (step, loss, examples/s, last checkpoint and
its save time). Elsewhere (CI logs, ``ray job submit``, files): one plain, timestamped
line every ``log_every_steps``, because carriage returns make unreadable logs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import TextIO

BAR_WIDTH = 20
_REDRAW_INTERVAL_S = 0.1


@dataclass
class ProgressState:
    """The latest values the progress line shows."""

    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    accuracy: float | None = None
    examples_per_sec: float | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_secs: float | None = None


@dataclass
class RunSummary:
    """The end-of-run record: printed, and written to ``<run_dir>/summary.json``."""

    name: str
    status: str  # "completed" | "preempted" | "failed"
    steps_completed: int
    total_steps: int
    wall_time_s: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    checkpoints_kept: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None
    failures: int = 0
    failures_recovered: int = 0
    recovery_time_s: float = 0.0
    recoveries: list[dict] = field(default_factory=list)  # RecoveryRecord.to_dict() of each, in order
    emergency_tier: str | None = None  # preempted: where the emergency checkpoint went
    error: str | None = None  # why the run failed (and what was lost), when it did

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bar(step: int, total: int) -> str:
    filled = BAR_WIDTH * min(step, total) // total if total else 0
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def format_progress(state: ProgressState, bar: bool = False) -> str:
    """One progress line, e.g. ``step 120/300 40% | loss 0.4312 | 1,234 ex/s | ckpt 100 (0.42 s)``."""
    pct = 100 * state.step // state.total_steps if state.total_steps else 0
    head = f"step {state.step}/{state.total_steps} {pct:3d}%"
    parts = [f"{_bar(state.step, state.total_steps)} {head}" if bar else head]
    if state.loss is not None:
        parts.append(f"loss {state.loss:.4f}")
    if state.accuracy is not None:
        parts.append(f"acc {state.accuracy:.4f}")
    if state.examples_per_sec is not None:
        parts.append(f"{state.examples_per_sec:,.0f} ex/s")
    if state.last_checkpoint_step is not None:
        secs = state.last_checkpoint_secs
        parts.append(f"ckpt {state.last_checkpoint_step}" + (f" ({secs:.2f} s)" if secs is not None else ""))
    return " | ".join(parts)


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())) or "-"


def format_summary(s: RunSummary) -> str:
    """The multi-line run summary."""
    failures = f"{s.failures} ({s.failures_recovered} recovered"
    failures += f", {s.recovery_time_s:.1f} s recovering)" if s.failures_recovered else ")"
    kept = ", ".join(s.checkpoints_kept) if s.checkpoints_kept else "none"
    lines = [
        f"Run summary: {s.name} ({s.status})",
        f"  steps             {s.steps_completed} / {s.total_steps}",
        f"  wall time         {s.wall_time_s:.1f} s",
        f"  final metrics     {_fmt_metrics(s.final_metrics)}",
        f"  checkpoints kept  {len(s.checkpoints_kept)}: {kept}",
        f"  last checkpoint   {s.last_checkpoint or 'none'}",
        f"  failures          {failures}",
    ]
    if s.recoveries:
        lines.append(f"  recovery          {_recovery_line(s.recoveries)}")
    if s.emergency_tier:
        lines.append(f"  preemption        emergency checkpoint tier: {s.emergency_tier}")
    if s.error:
        lines.append(f"  error             {s.error}")
    return "\n".join(lines)


def _recovery_line(recoveries: list[dict]) -> str:
    """Medians per phase, steps lost and the tiers the state came from."""
    def median(key: str) -> float:
        return statistics.median(r[key] for r in recoveries)

    tiers: dict[str, int] = {}
    for r in recoveries:
        tiers[r["tier"]] = tiers.get(r["tier"], 0) + 1
    phases = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {median(k):.2f}"
                       for k in ("detect_s", "replace_s", "restore_s", "first_step_s"))
    return (f"median {median('total_s'):.2f} s ({phases}); {sum(r['steps_lost'] for r in recoveries)} steps "
            f"lost; from {', '.join(f'{t} x{n}' for t, n in sorted(tiers.items()))}")


class ProgressDisplay:
    """Draws ``ProgressState`` on ``stream``: live line (``bar``), plain lines, or nothing."""

    def __init__(self, stream: TextIO, mode: str = "auto", log_every_steps: int = 10,
                 clock=time.monotonic):
        if mode == "auto":
            mode = "bar" if _is_tty(stream) else "plain"
        self.mode = mode
        self.stream = stream
        self.log_every_steps = max(1, log_every_steps)
        self._clock = clock
        self._last_draw = float("-inf")
        self._line_len = 0

    def update(self, state: ProgressState) -> None:
        """Show the new state: redraw the live line (at most 10 times a second) or log a line."""
        if self.mode == "bar":
            now = self._clock()
            if now - self._last_draw >= _REDRAW_INTERVAL_S or state.step >= state.total_steps:
                self._last_draw = now
                self._draw(format_progress(state, bar=True))
        elif self.mode == "plain":
            if state.step % self.log_every_steps == 0 or state.step >= state.total_steps:
                self._log(format_progress(state))

    def message(self, text: str) -> None:
        """An event line (checkpoint saved, failure) that stays above the live line."""
        if self.mode == "none":
            return
        if self.mode == "bar":
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            self._log(text)

    def finish(self) -> None:
        if self.mode == "bar" and self._line_len:
            self.stream.write("\n")
            self.stream.flush()
            self._line_len = 0

    def _draw(self, line: str) -> None:
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._line_len = len(line)

    def _clear(self) -> None:
        if self._line_len:
            self.stream.write("\r\x1b[K")
            self._line_len = 0
        self._last_draw = float("-inf")  # redraw on the next update

    def _log(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.stream.write(f"{stamp} {line}\n")
        self.stream.flush()


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())

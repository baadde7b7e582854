"""Watching a run: live progress, TensorBoard event files and the end-of-run summary.

The runtime calls a ``Reporter``; the reporter fans out to the progress display and
the TensorBoard writer. Nothing here imports Ray or the training engine.
"""

from orchestrator.monitor.events import EventFileWriter
from orchestrator.monitor.progress import ProgressDisplay, RunSummary, format_progress, format_summary
from orchestrator.monitor.reporter import Reporter

__all__ = ["EventFileWriter", "ProgressDisplay", "Reporter", "RunSummary", "format_progress", "format_summary"]

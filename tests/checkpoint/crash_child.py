"""The process the crash harness kills (see test_crash_consistency.py).

Run as ``python crash_child.py DIR``. It imports everything, then waits for a
``start`` line on stdin (so the harness can start the next child while the current
one runs). Then it checks what the previous, killed process left, as a fresh
reader would, and prints one JSON line::

    {"event": "check", "raw": <step per the state file, as TF reads it>,
     "latest": <step per a restarted CheckpointManager>, "files": [...], "tracked": [...]}

Then it obeys commands on stdin, one per line:

* ``save FIRST COUNT``: save steps FIRST, FIRST+1, ... printing
  ``{"event": "saving", "step": s}`` before and ``{"event": "saved", "step": s}`` after each;
* ``quit``.

With ``CRASH_PHASE=<phase>`` in the environment, it SIGKILLs itself the N-th time
(``CRASH_PHASE_COUNT``, default 1) the manager reaches that phase of a save
(shards_written, index_written, state_written, deleting, done): deterministic kills
between the commit steps.
Every line is flushed at once, so the parent knows which save was in flight.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

from orchestrator.checkpoint import reader, state
from orchestrator.checkpoint.manager import CheckpointManager

MAX_TO_KEEP = 2
NUM_SHARDS = 2


def tensors(step: int) -> dict[str, np.ndarray]:
    return {"global_step": np.array(step, np.int64), "w": np.full(64, step, np.float32),
            "b": np.full(8, -step, np.float64)}


def emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def step_of_valid(prefix: str | None) -> int | None:
    """Load and fully verify a checkpoint; its step (values must match it)."""
    if prefix is None:
        return None
    ckpt = reader.CheckpointReader(prefix)
    ckpt.verify()
    step = int(ckpt.get_tensor("global_step"))
    assert np.all(ckpt.get_tensor("w") == step) and np.all(ckpt.get_tensor("b") == -step), prefix
    return step


def kill_at(phase: str | None, count: int):
    seen = []

    def on_phase(name: str) -> None:
        if name == phase:
            seen.append(name)
            if len(seen) >= count:
                os.kill(os.getpid(), signal.SIGKILL)
    return on_phase


def main(directory: str) -> None:
    if sys.stdin.readline().strip() != "start":
        return
    raw = step_of_valid(state.latest_checkpoint(directory)) if os.path.isdir(directory) else None
    manager = CheckpointManager(directory, max_to_keep=MAX_TO_KEEP, fsync=False,
                                on_phase=kill_at(os.environ.get("CRASH_PHASE"),
                                                 int(os.environ.get("CRASH_PHASE_COUNT", "1"))))
    latest = step_of_valid(manager.latest_checkpoint)
    emit(event="check", raw=raw, latest=latest, files=sorted(os.listdir(directory)) if os.path.isdir(directory)
         else [], tracked=[os.path.basename(p) for p in manager.checkpoints])
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            return
        first, count = int(command[1]), int(command[2])
        for step in range(first, first + count):
            emit(event="saving", step=step)
            manager.save(tensors(step), step, num_shards=NUM_SHARDS)
            emit(event="saved", step=step, files=sorted(os.listdir(directory)),
                 tracked=[os.path.basename(p) for p in manager.checkpoints])


if __name__ == "__main__":
    main(sys.argv[1])

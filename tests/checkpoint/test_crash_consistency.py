"""Crash consistency: SIGKILL a saving process anywhere; the directory stays consistent.

Each round starts ``crash_child.py`` in a fresh process. It first checks what the
previous, killed process left behind (the latest checkpoint per the state file
loads and every CRC verifies; it is the last confirmed save or the one in flight;
a restarted manager agrees), then saves until it is killed: either by itself at a
named phase of the commit protocol (deterministic kills between every step) or
by this process after a random delay. After every completed save the directory
must hold exactly the kept checkpoints: no orphans, no temp files.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from orchestrator.checkpoint import reader
from orchestrator.checkpoint.errors import CorruptCheckpointError, CRCMismatchError
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.variables import Variable

CHILD = Path(__file__).with_name("crash_child.py")
REPO = Path(__file__).resolve().parents[2]
PHASES = ["shards_written", "index_written", "state_written", "deleting", "done"]
CONTROL_FILES = {"checkpoint", "checkpoint.manager.json"}
EVENT_TIMEOUT_S = 60


def expected_files(tracked: list[str]) -> set[str]:
    names = set(CONTROL_FILES)
    for prefix in tracked:
        names |= {f"{prefix}.index", f"{prefix}.data-00000-of-00002", f"{prefix}.data-00001-of-00002"}
    return names


class Child:
    """One crash_child process with its stdout read by a thread (reads never block the test)."""

    def __init__(self, directory: Path, phase: str | None, count: int, stderr_path: Path):
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
        env.pop("CRASH_PHASE", None)
        if phase:
            env.update(CRASH_PHASE=phase, CRASH_PHASE_COUNT=str(count))
        self.phase = phase
        self._stderr = open(stderr_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(CHILD), str(directory)], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)

    def next_event(self, timeout: float = EVENT_TIMEOUT_S):
        return self.events.get(timeout=timeout)

    def send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it already killed itself

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def remaining_events(self) -> list[dict]:
        assert self.proc.wait(timeout=EVENT_TIMEOUT_S) is not None
        self._stderr.close()
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events


class Harness:
    """Tracks what must be true of the directory after each kill.

    The next child is started (it imports, then waits) while the current one runs,
    so process start-up overlaps the rounds.
    """

    def __init__(self, directory: Path, seed: int, schedule: list[str | None]):
        self.directory = directory
        self.rng = random.Random(seed)
        self.confirmed: int | None = None  # last save the child reported complete
        self.in_flight: int | None = None  # save running when the child died
        self.next_step = 1
        self.saves_checked = 0
        self.mid_save_kills = 0  # kills that interrupted a save (the in-flight one)
        self.stderr = directory.parent / "children.stderr"
        self.schedule = list(schedule) + [None]  # the final, unkilled round
        self.spare = self._spawn(self.schedule[0])

    def _spawn(self, phase: str | None) -> Child:
        return Child(self.directory, phase, self.rng.randint(1, 3), self.stderr)

    def spawn(self) -> Child:
        """The waiting spare, told to start; a new spare for the next round is started."""
        child = self.spare
        self.schedule.pop(0)
        self.spare = self._spawn(self.schedule[0]) if self.schedule else None
        child.send("start")
        return child

    def check_start(self, event: dict) -> None:
        allowed = {self.confirmed} | ({self.in_flight} if self.in_flight is not None else set())
        context = f"confirmed={self.confirmed} in_flight={self.in_flight} event={event}"
        assert event["event"] == "check", context
        assert event["raw"] in allowed, "state file's latest is neither the previous nor the new save: " + context
        assert event["latest"] in allowed, "restarted manager's latest is wrong: " + context
        if event["raw"] is not None:
            assert event["latest"] >= event["raw"], context
        self.confirmed, self.in_flight = event["latest"], None

    def observe(self, event: dict) -> None:
        if event["event"] == "saving":
            self.in_flight = event["step"]
        elif event["event"] == "saved":
            self.confirmed, self.in_flight = event["step"], None
            assert set(event["files"]) == expected_files(event["tracked"]), f"orphans after save: {event}"
            assert len(event["tracked"]) <= 2 + 1, event  # max_to_keep plus at most one adopted
            self.saves_checked += 1

    def start_saving(self, child: Child, count: int) -> None:
        self.check_start(child.next_event())
        child.send(f"save {self.next_step} {count}")
        self.next_step += count

    def round_at_phase(self) -> None:
        child = self.spawn()
        self.start_saving(child, count=8)
        for event in child.remaining_events():
            self.observe(event)
        assert child.proc.returncode == -signal.SIGKILL, f"phase {child.phase} was never reached"
        self.mid_save_kills += self.in_flight is not None

    def round_at_random_time(self) -> None:
        child = self.spawn()
        if self.rng.random() < 0.2:  # sometimes while it starts up and repairs the directory
            threading.Event().wait(self.rng.uniform(0.0, 0.4))
        else:
            self.start_saving(child, count=10_000)
            threading.Event().wait(self.rng.uniform(0.0, 0.15))
        child.kill()
        for event in child.remaining_events():
            if event["event"] == "check":
                self.check_start(event)
            else:
                self.observe(event)
        self.mid_save_kills += self.in_flight is not None

    def close(self) -> None:
        if self.spare is not None:
            self.spare.kill()
            self.spare.remaining_events()

    def final_round(self) -> None:
        child = self.spawn()
        self.start_saving(child, count=1)
        saving, saved = child.next_event(), child.next_event()
        self.observe(saving)
        self.observe(saved)
        child.send("quit")
        assert child.remaining_events() == []
        assert set(os.listdir(self.directory)) == expected_files(saved["tracked"])
        assert len(saved["tracked"]) == 2


def run_harness(tmp_path: Path, kills: int, seed: int) -> Harness:
    """One kill in three at a named phase (each phase in turn), the others at random times."""
    schedule = [PHASES[(i // 3) % len(PHASES)] if i % 3 == 0 else None for i in range(kills)]
    harness = Harness(tmp_path / "ckpt", seed, schedule)
    try:
        for phase in schedule:
            if phase:
                harness.round_at_phase()
            else:
                harness.round_at_random_time()
        harness.final_round()
    finally:
        harness.close()
    return harness


def test_sigkill_at_every_phase_and_random_times(tmp_path):
    # 75 kills: 25 at named phases, 50 at random times (the CI floor is 50 random kills)
    harness = run_harness(tmp_path, kills=75, seed=1234)
    assert harness.saves_checked >= 40
    assert harness.mid_save_kills >= 30


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_soak_500(tmp_path):
    # 750 kills: 250 at named phases, 500 at random times
    harness = run_harness(tmp_path, kills=750, seed=99)
    assert harness.saves_checked >= 400
    assert harness.mid_save_kills >= 250


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_bit_flip_raises_crc_error_and_restore_falls_back(tmp_path):
    manager = CheckpointManager(str(tmp_path), max_to_keep=3)
    for step in (1, 2, 3):
        manager.save({"w": np.full(64, step, np.float32), "global_step": np.array(step, np.int64)}, step)
    newest = manager.prefix_for(3)
    data = reader.CheckpointReader(newest).data_paths()
    flip_byte(data[0], 17)
    with pytest.raises(CRCMismatchError, match="model.ckpt-3"):
        reader.CheckpointReader(newest).get_tensor("w")
    with pytest.raises(CRCMismatchError):
        reader.CheckpointReader(newest).verify()
    w = Variable("w", np.zeros(64, np.float32))
    with pytest.warns(RuntimeWarning, match="model.ckpt-3 failed verification"):
        restored = CheckpointManager(str(tmp_path), max_to_keep=3).restore_or_initialize([w])
    assert restored == manager.prefix_for(2)
    assert np.all(w.numpy() == 2)
    # renamed aside for inspection, so a re-save of step 3 cannot overwrite the evidence (issue 14)
    aside = sorted(n for n in os.listdir(tmp_path) if ".corrupt-" in n)
    assert [n.split(".corrupt-")[0] for n in aside] == ["model.ckpt-3.data-00000-of-00001", "model.ckpt-3.index"]
    assert not os.path.exists(data[0]) and not os.path.exists(newest + ".index")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = CheckpointManager(str(tmp_path), max_to_keep=3)
        assert again.latest_checkpoint == manager.prefix_for(2)
        again.save({"w": np.full(64, 30, np.float32), "global_step": np.array(3, np.int64)}, 3)
    assert sorted(n for n in os.listdir(tmp_path) if ".corrupt-" in n) == aside
    with pytest.raises(CRCMismatchError):
        _read_aside(tmp_path, aside)


def _read_aside(directory, aside):
    """The renamed files still form a readable (and still corrupt) checkpoint when renamed back."""
    restored = directory / "restored"
    restored.mkdir()
    for name in aside:
        os.link(directory / name, restored / name.split(".corrupt-")[0])
    reader.CheckpointReader(str(restored / "model.ckpt-3")).verify()


def test_every_checkpoint_corrupt_raises_instead_of_starting_over(tmp_path):
    manager = CheckpointManager(str(tmp_path), max_to_keep=3)
    for step in (1, 2):
        manager.save({"w": np.full(64, step, np.float32)}, step)
        flip_byte(reader.CheckpointReader(manager.prefix_for(step)).data_paths()[0], 17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorruptCheckpointError, match="no checkpoint in .* verifies") as info:
            CheckpointManager(str(tmp_path), max_to_keep=3).restore_or_initialize(None)
    assert "model.ckpt-1" in str(info.value) and "model.ckpt-2" in str(info.value)
    assert not [n for n in os.listdir(tmp_path) if ".corrupt-" in n]  # nothing renamed: the user decides


def _garble_index(prefix: str) -> None:
    with open(prefix + ".index", "r+b") as f:  # same size, bytes that are not a table
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        f.write(bytes(random.Random(7).randrange(256) for _ in range(size)))


def test_a_garbled_index_is_renamed_aside_not_overwritten_by_the_resave(tmp_path):
    """An index that is not a table fails verification like a CRC mismatch: it was dropped from the
    state without a trace, so the resumed run re-saved that step over the evidence."""
    manager = CheckpointManager(str(tmp_path), max_to_keep=3)
    for step in (1, 2):
        manager.save({"w": np.full(64, step, np.float32), "global_step": np.array(step, np.int64)}, step)
    _garble_index(manager.prefix_for(2))
    garbled = (tmp_path / "model.ckpt-2.index").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = CheckpointManager(str(tmp_path), max_to_keep=3)
        assert again.restore_or_initialize(None) == manager.prefix_for(1)
        again.save({"w": np.full(64, 20, np.float32), "global_step": np.array(2, np.int64)}, 2)
    aside = sorted(n for n in os.listdir(tmp_path) if ".corrupt-" in n)
    assert [n.split(".corrupt-")[0] for n in aside] == ["model.ckpt-2.data-00000-of-00001", "model.ckpt-2.index"]
    assert (tmp_path / next(n for n in aside if ".index" in n)).read_bytes() == garbled


def test_every_index_garbled_raises_instead_of_starting_over(tmp_path):
    manager = CheckpointManager(str(tmp_path), max_to_keep=3)
    for step in (1, 2):
        manager.save({"w": np.full(64, step, np.float32)}, step)
        _garble_index(manager.prefix_for(step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorruptCheckpointError, match="no checkpoint in .* verifies") as info:
            CheckpointManager(str(tmp_path), max_to_keep=3).restore_or_initialize(None)
    assert "model.ckpt-1" in str(info.value) and "model.ckpt-2" in str(info.value)
    assert not [n for n in os.listdir(tmp_path) if ".corrupt-" in n]

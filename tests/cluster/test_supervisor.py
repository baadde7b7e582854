"""Supervisor: real worker kills, a killed driver, a corrupted latest checkpoint."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.cluster.supervisor import JobFailedError, Supervisor
from orchestrator.config import load_config

REPO = Path(__file__).resolve().parents[2]
SAVE_EVERY = 10
STEPS = 40
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")

JOB_YAML = """\
name: ft-{tag}
run_dir: {root}/run
seed: 0
model: {{kind: mlp, hidden: [32], keep_prob_input: 0.9, keep_prob_hidden: 0.8}}
data: {{dataset: digits, global_batch_size: 64}}
optimizer: {{name: rmsprop, learning_rate: 0.001}}
train: {{steps: {steps}, log_every_steps: 1, eval_every_steps: 0}}
workers: {workers}
resources: {{cpus_per_worker: 0.5}}
checkpoint: {{dir: {root}/ckpt, save_every_steps: {save_every}, max_to_keep: 5, fsync: false}}
fault_tolerance: {{max_failures: 3, backoff_s: 0.0, step_timeout_s: 60, grace_period_s: 30}}
resume: auto
cluster: {{address: {address}}}
logging: {{level: info, progress: plain, tensorboard: false}}
"""


def write_job(root: Path, tag: str = "job", steps: int = STEPS, workers: str = "2",
              save_every: int = SAVE_EVERY, address: str = "null") -> Path:
    """A small digits-MLP job config under ``root``; returns the YAML path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "job.yaml"
    path.write_text(JOB_YAML.format(tag=tag, root=root, steps=steps, workers=workers,
                                    save_every=save_every, address=address))
    return path


class Recorder:
    """A reporter that records what the runtime reports and runs actions at given steps."""

    def __init__(self):
        self.steps: list[int] = []
        self.checkpoints: list[int] = []
        self.failures: list[str] = []
        self.recoveries: list = []
        self.actions: dict[int, callable] = {}

    def on_step(self, step, metrics):
        self.steps.append(step)
        action = self.actions.pop(step, None)
        if action is not None:
            action()

    def on_checkpoint(self, step, seconds, nbytes):
        self.checkpoints.append(step)

    def on_failure(self, cause, kind=None):
        self.failures.append(str(cause))

    def on_recovery(self, record):
        self.recoveries.append(record)


def worker_pids(supervisor: Supervisor) -> list[int]:
    import ray

    infos = ray.get([w.info.remote() for w in supervisor.coordinator.workers], timeout=60)
    return [info["pid"] for info in infos]


def read_all(prefix: str) -> dict[str, bytes]:
    reader = CheckpointReader(prefix)
    return {name: reader.get_tensor(name).tobytes()
            for name in sorted(reader.get_variable_to_shape_map())
            if not name.startswith("_")}


def restarts(steps: list[int]) -> list[tuple[int, int]]:
    """(last step before, first step after) for every time the step went backwards."""
    return [(a, b) for a, b in zip(steps, steps[1:]) if b <= a]


def cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "train", str(config), *extra]


def ray_address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """An uninterrupted run of the job: (checkpoint dir, final prefix)."""
    root = tmp_path_factory.mktemp("reference")
    result = Supervisor(load_config(write_job(root, "reference")), Recorder()).run()
    assert result.steps_completed == STEPS and not result.preempted
    return root / "ckpt", result.last_checkpoint


def test_killed_worker_alone_is_replaced_and_the_survivor_stays(ray_session, reference, tmp_path):
    """SIGKILL of rank 1: rank 0 keeps its process and rolls back from its memory checkpoint,
    rank 1's replacement restores from rank 0's copy; the result is bit-identical."""
    recorder = Recorder()
    supervisor = Supervisor(load_config(write_job(tmp_path)), recorder)
    seen: dict[str, list[int]] = {}

    def kill_rank_1():
        seen["before"] = worker_pids(supervisor)
        os.kill(seen["before"][1], signal.SIGKILL)

    recorder.actions = {25: kill_rank_1, 35: lambda: seen.update(after=worker_pids(supervisor))}
    result = supervisor.run()

    assert result.steps_completed == STEPS and result.failures_recovered == 1
    assert seen["after"][0] == seen["before"][0]  # the survivor kept its process
    assert seen["after"][1] != seen["before"][1]  # the killed rank was replaced
    [(last_before, first_after)] = restarts(recorder.steps)
    restored = first_after - 1
    assert restored == 20 and last_before - restored <= SAVE_EVERY  # lost <= one interval
    assert len(recorder.failures) == 1 and "rank 1" in recorder.failures[0]
    [recovery] = recorder.recoveries
    assert recovery.total_s > 0 and recovery.tier == "peer_memory" and recovery.workers_replaced == 1
    assert read_all(result.last_checkpoint) == read_all(reference[1])  # bit-identical


def test_too_many_failures_raise_a_clear_error(ray_session, tmp_path):
    recorder = Recorder()
    config = load_config(write_job(tmp_path), ["fault_tolerance.max_failures=0"])
    supervisor = Supervisor(config, recorder)
    recorder.actions = {5: lambda: os.kill(worker_pids(supervisor)[0], signal.SIGKILL)}
    with pytest.raises(JobFailedError, match=r"(?s)rank 0.*max_failures=0"):
        supervisor.run()


def test_corrupted_latest_checkpoint_falls_back_and_is_kept(ray_session, reference, tmp_path,
                                                           caplog):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0], ckpt)
    bad = ckpt / f"model.ckpt-{STEPS}.data-00000-of-00002"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern inside a tensor
    bad.write_bytes(bytes(data))
    recorder = Recorder()
    config = load_config(write_job(tmp_path), [f"train.steps={STEPS + 5}"])
    kept = {}
    recorder.actions = {STEPS - SAVE_EVERY + 1: lambda: kept.update(  # renamed aside: a re-save cannot overwrite it
        data=next(ckpt.glob(bad.name + ".corrupt-*")).read_bytes(),
        index=any(ckpt.glob(f"model.ckpt-{STEPS}.index.corrupt-*")))}

    with caplog.at_level(logging.WARNING, logger="orchestrator.cluster.supervisor"):
        result = Supervisor(config, recorder).run()

    assert recorder.steps[0] == STEPS - SAVE_EVERY + 1  # resumed from the previous one
    assert kept == {"data": bytes(data), "index": True}  # the bad one was kept for inspection
    warnings = [r.getMessage() for r in caplog.records if "verification" in r.getMessage()]
    assert warnings and f"model.ckpt-{STEPS}" in warnings[0]
    assert result.steps_completed == STEPS + 5


def committed_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in ckpt.glob("model.ckpt-*.index"))


def _first_step_line(output: str) -> int:
    return int(STEP_LINE.search(output).group(1))


def test_driver_killed_with_sigkill_resumes_and_cleans_leftovers(ray_session, tmp_path):
    steps = 400
    config = write_job(tmp_path, "driver-kill", steps=steps,
                       address=f'"{ray_address(ray_session)}"')
    ckpt = tmp_path / "ckpt"
    driver = subprocess.Popen(cli(config), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(committed_steps(ckpt)) < 2 and driver.poll() is None:
            assert time.monotonic() < deadline, "no two checkpoints within 120 s"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=30) == -signal.SIGKILL
    finally:
        if driver.poll() is None:
            driver.kill()
    latest = max(committed_steps(ckpt))
    assert latest < steps
    leftover_data = ckpt / "model.ckpt-99990.data-00000-of-00002"
    leftover_tmp = ckpt / "model.ckpt-99990.index.tmp-0123456789ab"
    shutil.copy(ckpt / f"model.ckpt-{latest}.data-00000-of-00002", leftover_data)
    leftover_tmp.write_bytes(b"half an index")

    rerun = subprocess.run(cli(config), cwd=REPO, capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _first_step_line(rerun.stdout) == latest + 1
    assert not leftover_data.exists() and not leftover_tmp.exists()
    assert max(committed_steps(ckpt)) == steps

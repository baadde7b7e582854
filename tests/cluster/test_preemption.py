"""Preemption: the watcher's sources (signals, notice file), the emergency checkpoint,
and a real SIGTERM to a real driver process (exit code 3, rerun resumes).

The Ray drain source is tested on a multi-node cluster in test_node_loss.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from orchestrator.cluster.preemption import PreemptionWatcher
from orchestrator.cluster.supervisor import Supervisor
from orchestrator.config import load_config
from orchestrator.exit_codes import EXIT_PREEMPTED
from tests.cluster.fake_metadata import FakeMetadataServer
from tests.cluster.test_supervisor import (
    REPO, STEP_LINE, Recorder, committed_steps, cli, ray_address, write_job)


def test_sigterm_sets_the_flag_and_previous_handler_comes_back():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with PreemptionWatcher(poll_interval_s=0.0) as watcher:
            assert not watcher.requested()
            os.kill(os.getpid(), signal.SIGTERM)
            assert watcher.requested()
            assert "SIGTERM" in watcher.reason
        os.kill(os.getpid(), signal.SIGTERM)  # the handler from before is back
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_first_sigint_requests_second_interrupts():
    with PreemptionWatcher(poll_interval_s=0.0) as watcher:
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.requested() and "SIGINT" in watcher.reason
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_notice_file_is_polled(tmp_path):
    notice = tmp_path / "preempt"
    watcher = PreemptionWatcher(notice_file=str(notice), poll_interval_s=0.0)
    assert not watcher.requested()
    notice.write_text("soon")
    assert watcher.requested()
    assert str(notice) in watcher.reason


def test_polling_is_rate_limited_but_flag_stays(tmp_path):
    now = [0.0]
    notice = tmp_path / "preempt"
    watcher = PreemptionWatcher(notice_file=str(notice), poll_interval_s=5.0,
                                clock=lambda: now[0])
    assert not watcher.requested()
    notice.write_text("")
    now[0] = 4.0
    assert not watcher.requested()  # next poll not due yet
    now[0] = 5.0
    assert watcher.requested() and watcher.requested_at == 5.0
    notice.unlink()
    assert watcher.requested()  # a notice is never withdrawn


def test_first_reason_wins():
    watcher = PreemptionWatcher()
    watcher.request("first")
    watcher.request("second")
    assert watcher.reason == "first"


def test_drain_query_without_workers_on_draining_nodes_is_quiet(ray_session):
    node_id = ray_session.get_runtime_context().get_node_id()
    watcher = PreemptionWatcher(worker_node_ids=lambda: [node_id], poll_interval_s=0.0)
    assert not watcher.requested()


# ---------------------------------------------------------------- end to end

def test_notice_file_triggers_emergency_checkpoint_of_current_step(ray_session, tmp_path):
    notice = tmp_path / "preemption-notice"
    config = load_config(write_job(tmp_path / "job"),
                         [f"fault_tolerance.preemption_notice_file={notice}"])
    recorder = Recorder()
    recorder.actions = {15: notice.touch}
    supervisor = Supervisor(config, recorder)
    supervisor.watcher.poll_interval_s = 0.0
    handler_before = signal.getsignal(signal.SIGTERM)

    result = supervisor.run()

    # acted on at the end of the chunk of steps that held step 15: that step is checkpointed
    stopped = result.steps_completed
    assert result.preempted and stopped >= 15
    assert result.last_checkpoint.endswith(f"model.ckpt-{stopped}")
    assert recorder.checkpoints == [10, stopped]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers restored


def test_sigterm_to_driver_saves_exits_3_and_rerun_resumes(ray_session, tmp_path):
    steps, grace = 400, 30
    config = write_job(tmp_path, "sigterm", steps=steps,
                       address=f'"{ray_address(ray_session)}"')
    ckpt = tmp_path / "ckpt"
    driver = subprocess.Popen(cli(config), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not committed_steps(ckpt) and driver.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        sent = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=grace)
        waited = time.monotonic() - sent
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == EXIT_PREEMPTED, output[-3000:]
    assert waited < grace
    last_printed = [int(m.group(1)) for m in STEP_LINE.finditer(output)][-1]
    assert max(committed_steps(ckpt)) == last_printed < steps  # checkpoint of that step

    rerun = subprocess.run(cli(config), cwd=REPO, capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert int(STEP_LINE.search(rerun.stdout).group(1)) == last_printed + 1
    assert max(committed_steps(ckpt)) == steps


@pytest.mark.parametrize("cloud, path, seconds", [
    ("gce", "/computeMetadata/v1", 30),  # GCE's notice is always 30 s
    ("aws", "", 20),                     # the fake's instance-action time
    ("azure", "", 20),                   # the fake's NotBefore
])
def test_cloud_notice_checkpoints_and_exits_3_before_the_deadline(ray_session, tmp_path, cloud, path, seconds):
    config = write_job(tmp_path, cloud, steps=400, address=f'"{ray_address(ray_session)}"')
    ckpt = tmp_path / "ckpt"
    with FakeMetadataServer() as fake:
        notices = "fault_tolerance.preemption_notices"
        driver = subprocess.Popen(
            cli(config, "--set", f"{notices}.{cloud}=true", "--set", f"{notices}.{cloud}_endpoint={fake.url}{path}",
                "--set", f"{notices}.poll_interval_s=0.2"),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            started = time.monotonic()
            while not committed_steps(ckpt) and driver.poll() is None:
                assert time.monotonic() - started < 120, "no checkpoint within 120 s"
                time.sleep(0.02)
            deadline = fake.preempt(cloud, seconds)
            output, _ = driver.communicate(timeout=seconds + 30)
            exited = time.time()
        finally:
            if driver.poll() is None:
                driver.kill()
    assert driver.returncode == EXIT_PREEMPTED, output[-3000:]
    assert exited < deadline, f"exited {exited - deadline:.1f} s after the deadline"
    assert f"preemption requested: {'GCE' if cloud == 'gce' else ''}" in output
    last_printed = [int(m.group(1)) for m in STEP_LINE.finditer(output)][-1]
    assert max(committed_steps(ckpt)) == last_printed < 400  # the emergency checkpoint of that step
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "preempted"


def test_preemption_during_backoff_returns_without_restarting(ray_session, tmp_path):
    backoff = 60.0
    config = load_config(write_job(tmp_path / "job"),
                         ["fault_tolerance.backoff_s=60", "fault_tolerance.max_failures=5"])
    recorder = Recorder()
    supervisor = Supervisor(config, recorder)
    recorder.actions = {13: lambda: os.kill(_pid_of_rank(supervisor, 0), signal.SIGKILL)}
    recorder.on_failure = lambda cause, kind=None: supervisor.watcher.request("test: notice in backoff")

    started = time.monotonic()
    result = supervisor.run()

    assert time.monotonic() - started < backoff / 2  # did not sit out the backoff
    assert result.preempted and len(supervisor.attempts) == 1
    assert result.last_checkpoint.endswith("model.ckpt-10") and result.steps_completed == 10


def _pid_of_rank(supervisor: Supervisor, rank: int) -> int:
    import ray

    worker = supervisor.coordinator.workers[rank]
    return ray.get(worker.info.remote(), timeout=60)["pid"]

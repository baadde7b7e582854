"""Fail closed (issue 14), through the CLI as an operator or an attacker meets it.

Real components only: real ``orchestrator`` processes, a real local Ray, real files, real
signals, a real HTTP server on 127.0.0.1 that counts the requests it gets.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.checkpoint import writer
from orchestrator.checkpoint.manager import CheckpointManager, list_checkpoints
from orchestrator.checkpoint.storage import Storage
from orchestrator.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED
from tests.test_cli import QUICKSTART, REPO, _progress_steps, _tensors, run_cli

FAST = ("train.log_every_steps=1", "train.eval_every_steps=0", "logging.tensorboard=false")


def train(tmp_path: Path, *sets: str, ckpt: Path | None = None, run: Path | None = None, timeout: float = 300):
    """``orchestrator train configs/quickstart.yaml`` with a fresh in-process Ray (RAY_ADDRESS=local)."""
    args = ["train", str(QUICKSTART), "--set", f"run_dir={run or tmp_path / 'run'}",
            "--set", f"checkpoint.dir={ckpt or tmp_path / 'ckpt'}", "--set", "logging.progress=plain"]
    for s in (*FAST, *sets):
        args += ["--set", s]
    return run_cli(*args, cwd=tmp_path, env={"RAY_ADDRESS": "local"}, timeout=timeout)


def _committed_elsewhere(tmp_path: Path) -> list[Path]:
    """Checkpoints outside the job's directory that a hostile state file or sidecar points at."""
    (tmp_path / "victim").mkdir()
    writer.write_checkpoint(str(tmp_path / "victim" / "users"), {"v": np.arange(3.0)})
    writer.write_checkpoint(str(tmp_path / "victim" / "model.ckpt-100"), {"v": np.arange(3.0)})
    return sorted((tmp_path / "victim").iterdir())


# ---------------------------------------------------------------------------- containment
def test_hostile_state_file_and_sidecar_touch_nothing_outside(tmp_path):
    """Items 1, 2, 6: sidecar pending deletions and state entries elsewhere, then a run with max_to_keep 1.

    Nothing outside is deleted, the s3:// entry of someone else's bucket is never contacted
    (on main: NoCredentialsError), and the run resumes from the good local checkpoint.
    """
    first = train(tmp_path, "train.steps=2", "checkpoint.save_every_steps=2")
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    victims = _committed_elsewhere(tmp_path)
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint").write_text(
        'model_checkpoint_path: "s3://someone-elses-bucket/runs/model.ckpt-9"\n'
        f'all_model_checkpoint_paths: "{tmp_path / "victim" / "model.ckpt-100"}"\n'
        'all_model_checkpoint_paths: "../victim/users"\n'
        'all_model_checkpoint_paths: "model.ckpt-2"\n'
        'all_model_checkpoint_paths: "s3://someone-elses-bucket/runs/model.ckpt-9"\n')
    sidecar = json.loads((ckpt / "checkpoint.manager.json").read_text())
    sidecar["pending_deletions"] = ["../victim/users", str(tmp_path / "victim" / "model.ckpt-100")]
    (ckpt / "checkpoint.manager.json").write_text(json.dumps(sidecar))

    second = train(tmp_path, "train.steps=4", "checkpoint.save_every_steps=1", "checkpoint.max_to_keep=1")
    assert second.returncode == EXIT_OK, second.stderr[-3000:]
    assert _progress_steps(second.stdout)[0] == 3  # resumed from the local model.ckpt-2
    assert all(p.exists() for p in victims) and sorted((tmp_path / "victim").iterdir()) == victims
    log = (tmp_path / "run" / "train.log").read_text() + second.stderr
    for entry in ("s3://someone-elses-bucket/runs/model.ckpt-9", "../victim/users"):
        assert repr(entry) in log  # each ignored entry is named
    assert sorted(p.name for p in ckpt.glob("*.index")) == ["model.ckpt-4.index"]


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    _CountingHandler.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _CountingHandler.requests
    server.shutdown()
    server.server_close()


def test_urls_in_a_local_state_file_are_never_fetched(tmp_path, http_server):
    """Item 6: inspect/export of a local directory whose state file names an http:// URL."""
    url, requests = http_server
    ckpt = tmp_path / "ckpt"
    CheckpointManager(str(ckpt)).save(_tensors(7), 7)
    (ckpt / "checkpoint").write_text(f'model_checkpoint_path: "{url}/stolen/model.ckpt-9"\n'
                                     f'all_model_checkpoint_paths: "{url}/stolen/model.ckpt-9"\n')
    inspect = run_cli("inspect", str(ckpt))
    export = run_cli("export", str(ckpt), "--format", "safetensors", "-o", str(tmp_path / "out.safetensors"))
    ls = run_cli("ls", str(ckpt))
    assert requests == []
    for proc in (inspect, export):  # the only latest named is ignored: nothing to read, bad input
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
        assert f"{url}/stolen/model.ckpt-9" in proc.stderr
    assert ls.returncode == EXIT_OK and "model.ckpt-7" in ls.stdout


# ---------------------------------------------------------------------------- helpers
def start_train(tmp_path: Path, *sets: str, ckpt: Path | str | None = None, run: Path | None = None,
                prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """A ``train`` process that the test signals or kills; its output is read by ``Output``."""
    args = ["train", str(QUICKSTART), "--set", f"run_dir={run or tmp_path / 'run'}",
            "--set", f"checkpoint.dir={ckpt or tmp_path / 'ckpt'}", "--set", "logging.progress=plain"]
    for s in (*FAST, *sets):
        args += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen([*prefix, sys.executable, "-m", "orchestrator.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Output:
    """Both streams of a process, read by threads, so a test can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self._cond = proc, [], threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
        for t in self._threads:
            t.start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((l for l in self.lines if re.search(pattern, l)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.text[-4000:]}")
                self._cond.wait(min(left, 0.2))

    def finish(self, timeout: float = 240) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        for t in self._threads:
            t.join(timeout=10)
        return code

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)


def ray_processes_of(driver_pid: int) -> list[str]:
    """Command lines of processes of the Ray session a driver started (its session dir ends in its pid)."""
    pattern = re.compile(rf"session_[\d_-]+_{driver_pid}\b")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern.search(cmdline):
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def assert_no_ray_left(driver_pid: int, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while ray_processes_of(driver_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes_of(driver_pid) == [], "orphaned Ray processes"


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    """A real mount (``mount <options> <target>``), unmounted afterwards; skips where this user cannot mount."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or 'not root'}): needs root to test a real mount")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def flip_byte(path: Path, offset: int = 20) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def s3_sets(bucket_url: str, server: str) -> tuple[str, str]:
    options = ("{key: testing, secret: testing, use_listings_cache: false, skip_instance_cache: true, "
               f"client_kwargs: {{endpoint_url: '{server}', region_name: us-east-1}}}}")
    return (f"checkpoint.dir={bucket_url}", f"checkpoint.storage_options={options}")


# ---------------------------------------------------------------------------- pre-flight (no Ray needed)
def _assert_stopped_before_start(proc, tmp_path: Path, *needles: str) -> None:
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written: no run dir, no log, no config dump


def test_read_only_checkpoint_dir_exits_2_before_anything_starts(tmp_path):
    """Item 3: on main every save failed, the run exited 0 with 'checkpoints kept 0'."""
    source = tmp_path / "source"
    source.mkdir()
    with mounted(tmp_path / "ro", "--bind", str(source)) as target:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        proc = train(tmp_path, ckpt=target / "ckpt", timeout=60)
    _assert_stopped_before_start(proc, tmp_path, "is not writable", "Read-only file system", str(target / "ckpt"))


def test_run_dir_that_is_a_file_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    """run_dir is a path the user gave: one that cannot be created is bad input (exit 2, one line
    naming run_dir), not exit 1 with a bare FileExistsError; the checkpoint directory stays untouched."""
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("not a directory\n")
    code = main(["train", str(QUICKSTART), "--set", f"run_dir={tmp_path / 'taken'}",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", "--set", "train.steps=2"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run_dir '{tmp_path / 'taken'}' "), err
    assert (tmp_path / "taken").read_text() == "not a directory\n"
    assert not (tmp_path / "ckpt").exists() or not list_checkpoints(str(tmp_path / "ckpt"))


def test_checkpoint_dir_without_permission_exits_2(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    # root ignores permission bits: drop the capabilities that let it (a real EACCES, not a simulation)
    prefix = () if os.geteuid() != 0 else ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
                                           "--inh-caps=-dac_override,-dac_read_search,-fowner", "--")
    if prefix and subprocess.run(["setpriv", "--help"], capture_output=True).returncode != 0:
        pytest.skip("running as root without setpriv: cannot drop the capabilities that bypass permissions")
    output = Output(start_train(tmp_path, ckpt=parent / "ckpt", prefix=prefix))
    assert output.finish(timeout=60) == EXIT_BAD_INPUT, output.text[-3000:]
    assert "Permission denied" in output.text and "Traceback" not in output.text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "parent_file"])
def test_checkpoint_dir_that_is_a_file_fails_validate_and_train(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    ckpt = blocker if where == "file" else blocker / "ckpt"
    validate = run_cli("validate", str(QUICKSTART), "--set", f"checkpoint.dir={ckpt}")
    assert validate.returncode == EXIT_BAD_INPUT and "is a file" in validate.stderr, validate.stdout + validate.stderr
    if where == "file":
        _assert_stopped_before_start(train(tmp_path, ckpt=ckpt, timeout=60), tmp_path, "is a file")


def test_missing_bucket_exits_2(tmp_path, s3_server):
    proc = train(tmp_path, *s3_sets("s3://no-such-bucket-here/runs/q", s3_server), timeout=60)
    _assert_stopped_before_start(proc, tmp_path, "s3://no-such-bucket-here/runs/q", "bucket does not exist")


def test_resume_to_a_missing_path_exits_2_and_writes_nothing(tmp_path):
    proc = train(tmp_path, f"resume={tmp_path / 'nothing' / 'model.ckpt-5'}", timeout=60)
    _assert_stopped_before_start(proc, tmp_path, "resume: no committed checkpoint", "nothing/model.ckpt-5")
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------- one run per directory
def _committed_steps(ckpt: str, options=None) -> list[int]:
    return [i.step for i in list_checkpoints(ckpt, storage_options=options) if i.problem is None]


def test_second_run_exits_2_naming_the_holder_and_a_relaunch_after_sigkill_resumes(tmp_path):
    """Item 4 with two real CLI processes on the same directories, then the first one SIGKILLed."""
    first = Output(start_train(tmp_path, "train.steps=100000", "checkpoint.save_every_steps=5"))
    try:
        first.wait_for(r"checkpoint at step 5 saved")
        second = train(tmp_path, "seed=7", "train.steps=10", timeout=120)  # same dirs, another seed
        assert second.returncode == EXIT_BAD_INPUT, second.stderr[-3000:]
        assert f"pid {first.proc.pid}" in second.stderr and "in use by run 'quickstart'" in second.stderr
        assert "Started a local Ray" not in second.stderr and "Traceback" not in second.stderr
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.finish()
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("starting quickstart") == 1  # the second run never touched the first run's log
    committed = max(_committed_steps(str(tmp_path / "ckpt")))
    third = train(tmp_path, f"train.steps={committed + 3}", "checkpoint.save_every_steps=100")
    assert third.returncode == EXIT_OK, third.stderr[-3000:]  # no manual step: the lock died with its process
    assert _progress_steps(third.stdout)[0] == committed + 1


@pytest.mark.slow  # the lease logic runs in the default suite in tests/checkpoint/test_claim.py
def test_s3_lease_second_run_exits_2_and_a_relaunch_waits_out_a_dead_drivers_lease(tmp_path, s3_bucket, s3_server,
                                                                                    s3_options):
    url = s3_bucket + "/runs/q"
    sets = (*s3_sets(url, s3_server), "checkpoint.lease_timeout_s=4", "checkpoint.save_every_steps=5")
    first = Output(start_train(tmp_path, "train.steps=100000", *sets))
    try:
        first.wait_for(r"checkpoint at step 5 saved")
        second = train(tmp_path, *sets, "train.steps=10", run=tmp_path / "run2", timeout=120)
        assert second.returncode == EXIT_BAD_INPUT, second.stderr[-3000:]
        assert f"pid {first.proc.pid}" in second.stderr and "Started a local Ray" not in second.stderr
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.finish()
    # the driver died on "another machine": its lease is fresh, nothing says it is gone but time
    storage, path = Storage.for_path(url + "/.orchestrator.lock", s3_options)
    record = json.loads(storage.read_bytes(path))
    storage.write_bytes(path, json.dumps({**record, "host": "another-machine", "heartbeat": time.time()}).encode())
    committed = max(_committed_steps(url, s3_options))
    # 45 s: the relaunch must meet the lease still fresh, also on a busy machine (slow start-up)
    third = train(tmp_path, *sets, f"train.steps={committed + 2}", "checkpoint.lease_timeout_s=45",
                  run=tmp_path / "run3")
    assert third.returncode == EXIT_OK, third.stderr[-3000:]
    assert "waiting for the lease to expire" in third.stderr and "another-machine" in third.stderr
    assert _progress_steps(third.stdout)[0] == committed + 1


# ---------------------------------------------------------------------------- no silent loss
def _summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_full_disk_fails_the_job_after_max_consecutive_failures(tmp_path):
    """Item 3, full disk: every save failed, yet the run ended 'completed', exit 0, 'checkpoints kept 0'."""
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=256k", "tmpfs") as disk:
        proc = train(tmp_path, "train.steps=1000", "checkpoint.save_every_steps=1", "checkpoint.async_save=false",
                     "checkpoint.max_consecutive_failures=3", ckpt=disk / "ckpt")
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["checkpoints_kept"] == []
    assert "3 checkpoint saves in a row failed" in summary["error"] and "No space left on device" in summary["error"]
    assert "no checkpoint was ever committed" in summary["error"] and summary["steps_completed"] < 10
    assert "3 checkpoint saves in a row failed" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # the same rule through the coordinator: tests/cluster/test_saving.py
def test_final_checkpoint_that_did_not_commit_never_exits_0(tmp_path):
    """A run whose only save is the final one, on a full disk: exit 1 and the summary says what was lost."""
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=256k", "tmpfs") as disk:
        proc = train(tmp_path, "train.steps=6", "checkpoint.save_every_steps=100", ckpt=disk / "ckpt")
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["steps_completed"] == 6
    assert "the final checkpoint at step 6 did not commit" in summary["error"]
    assert "the last 6 step(s) of training are lost" in summary["error"]


# ---------------------------------------------------------------------------- signals at start-up and shut-down
def _lock_taken(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never took its lock"
        time.sleep(0.02)


def test_sigint_during_start_up_exits_cleanly(tmp_path):
    """On main: a raw KeyboardInterrupt traceback."""
    output = Output(start_train(tmp_path, "train.steps=50"))
    _lock_taken(tmp_path / "ckpt" / ".orchestrator.lock", output.proc)
    output.proc.send_signal(signal.SIGINT)
    code = output.finish(timeout=180)
    assert code == EXIT_PREEMPTED, output.text[-3000:]
    assert "Traceback" not in output.text and "KeyboardInterrupt" not in output.text
    assert "SIGINT received by the driver" in output.text
    assert _summary(tmp_path)["status"] == "preempted"
    assert_no_ray_left(output.proc.pid)


def test_sigterm_while_ray_starts_exits_cleanly_and_leaves_no_ray_behind(tmp_path):
    """On main: exit -15 and Ray's processes orphaned for a minute."""
    output = Output(start_train(tmp_path, "train.steps=50"))
    output.wait_for(r"starting quickstart")  # logged just before Ray starts
    time.sleep(0.5)
    output.proc.send_signal(signal.SIGTERM)
    code = output.finish(timeout=180)
    assert code == EXIT_PREEMPTED, output.text[-3000:]
    assert "Traceback" not in output.text and "SIGTERM received by the driver" in output.text
    assert _summary(tmp_path)["status"] == "preempted"
    assert_no_ray_left(output.proc.pid)


def test_second_sigint_after_the_emergency_checkpoint_committed(tmp_path):
    """On main: exit 1 and 'checkpoints kept 0' although the emergency checkpoint was committed."""
    output = Output(start_train(tmp_path, "train.steps=100000", "checkpoint.save_every_steps=100000"))
    output.wait_for(r" step \d+/100000")
    output.proc.send_signal(signal.SIGINT)
    line = output.wait_for(r"checkpoint at step \d+ saved")
    output.proc.send_signal(signal.SIGINT)  # the impatient second Ctrl-C, right after the commit
    code = output.finish(timeout=180)
    step = int(re.search(r"checkpoint at step (\d+)", line).group(1))
    assert code == EXIT_PREEMPTED, output.text[-3000:]
    summary = _summary(tmp_path)
    assert summary["status"] == "preempted" and summary["last_checkpoint"].endswith(f"model.ckpt-{step}")
    assert summary["checkpoints_kept"] and "Traceback" not in output.text
    assert _committed_steps(str(tmp_path / "ckpt")) == [step]


# ---------------------------------------------------------------------------- corrupt checkpoints
@pytest.mark.slow  # the manager's rename and refusal run in the default suite (test_crash_consistency.py)
@pytest.mark.timeout(900)  # four runs of the CLI
def test_corrupt_latest_is_renamed_aside_and_all_corrupt_stops_with_2(tmp_path):
    first = train(tmp_path, "train.steps=4", "checkpoint.save_every_steps=2")
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    flip_byte(ckpt / "model.ckpt-4.data-00001-of-00002")
    corrupt_bytes = (ckpt / "model.ckpt-4.data-00001-of-00002").read_bytes()
    second = train(tmp_path, "train.steps=6", "checkpoint.save_every_steps=2")
    assert second.returncode == EXIT_OK, second.stderr[-3000:]
    assert _progress_steps(second.stdout)[0] == 3  # resumed from model.ckpt-2
    aside = sorted(ckpt.glob("model.ckpt-4.data-00001-of-00002.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == corrupt_bytes  # not overwritten by the re-save of step 4
    assert _committed_steps(str(ckpt)) == [2, 4, 6]
    for step in (2, 4, 6):
        flip_byte(ckpt / f"model.ckpt-{step}.data-00000-of-00002")
    third = train(tmp_path, "train.steps=8")
    assert third.returncode == EXIT_BAD_INPUT, third.stderr[-3000:]
    assert "verifies" in third.stderr.strip().splitlines()[-1] and "resume: never" in third.stderr
    fresh = train(tmp_path, "train.steps=2", "resume=never")
    assert fresh.returncode == EXIT_OK, fresh.stderr[-3000:]


# ---------------------------------------------------------------------------- ls / inspect on bad input
def test_ls_of_a_missing_directory_or_bucket_is_bad_input(tmp_path, s3_server):
    proc = run_cli("ls", str(tmp_path / "nothing"))
    assert proc.returncode == EXIT_BAD_INPUT and "does not exist" in proc.stderr
    opts = ["--storage-option", "key=testing", "--storage-option", "secret=testing",
            "--storage-option", f"client_kwargs.endpoint_url={s3_server}"]
    proc = run_cli("ls", "s3://no-such-bucket-abc/ckpt", *opts)
    assert proc.returncode == EXIT_BAD_INPUT and "bucket s3://no-such-bucket-abc does not exist" in proc.stderr


def test_ls_flags_a_garbage_index_and_a_missing_shard(tmp_path):
    ckpt = tmp_path / "ckpt"
    manager = CheckpointManager(str(ckpt))
    for step in (1, 2, 3):
        manager.save(_tensors(step), step, num_shards=2)
    (ckpt / "model.ckpt-1.index").write_bytes(b"garbage" * 10)
    (ckpt / "model.ckpt-2.data-00001-of-00002").unlink()
    proc = run_cli("ls", str(ckpt))
    assert proc.returncode == EXIT_OK, proc.stderr
    rows = {r.split()[0]: r for r in proc.stdout.splitlines()[1:]}
    assert proc.stdout.splitlines()[0].rstrip().endswith("PROBLEM")
    assert "CorruptCheckpointError" in rows["1"] and "missing" in rows["2"] and rows["3"].rstrip().endswith("-")
    listed = {r["step"]: r["problem"] for r in json.loads(run_cli("ls", str(ckpt), "--json").stdout)}
    assert listed[3] is None and "model.ckpt-1.index" in listed[1] and "data-00001-of-00002" in listed[2]


def test_index_that_is_a_directory_and_a_crc_failure_are_bad_input(tmp_path):
    ckpt = tmp_path / "ckpt"
    CheckpointManager(str(ckpt)).save(_tensors(5), 5)
    (ckpt / "model.ckpt-9.index").mkdir()
    proc = run_cli("inspect", str(ckpt / "model.ckpt-9"))
    assert proc.returncode == EXIT_BAD_INPUT and "is a directory" in proc.stderr, proc.stderr
    flip_byte(ckpt / "model.ckpt-5.data-00000-of-00001", 40)
    proc = run_cli("inspect", str(ckpt / "model.ckpt-5"), "--all-tensors")
    assert proc.returncode == EXIT_BAD_INPUT and "checksum mismatch" in proc.stderr, proc.stderr  # on main: 1
    (ckpt / "model.ckpt-5.data-00000-of-00001").unlink()  # and a missing shard: the same exit code
    proc = run_cli("inspect", str(ckpt / "model.ckpt-5"), "--all-tensors")
    assert proc.returncode == EXIT_BAD_INPUT and "model.ckpt-5.data-00000-of-00001" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- bounded input, error base
@pytest.mark.parametrize("case", ["billion-laughs", "deep-flow-nesting"])
def test_hostile_yaml_stops_train_before_anything_starts(tmp_path, case):
    """Item 5 and item 8's RecursionError, where they hung or crashed: ``train`` (validate: test_config)."""
    from tests.test_config import BOUNDED, _write_case

    _, text, _, expected = next(c for c in BOUNDED if c[0] == case)
    path, line = _write_case(tmp_path, text)
    proc = run_cli("train", str(path), cwd=tmp_path, env={"RAY_ADDRESS": "local"}, timeout=60)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"error: {path}:{line}:")
    assert expected in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # no run dir, no checkpoint dir


# Exceptions that never leave their module: turned into a ConfigError (Problem) or caught where raised.
_INTERNAL_EXCEPTIONS = {"orchestrator.config.Problem", "orchestrator.checkpoint.bundle._Aborted"}


def test_every_error_the_project_defines_derives_from_orchestrator_error():
    """"One error base": a new error class that forgets it fails here, naming the class."""
    import importlib
    import inspect
    import pkgutil

    import orchestrator
    from orchestrator.errors import OrchestratorError

    stray, modules = [], 0
    for info in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
        if info.name.endswith("__main__"):  # runs the CLI when imported
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError as exc:  # an optional dependency (cupy on a machine without a GPU)
            assert "cupy" in str(exc) or "cuda" in str(exc).lower(), (info.name, exc)
            continue
        modules += 1
        for name, cls in inspect.getmembers(module, inspect.isclass):
            where = f"{cls.__module__}.{cls.__qualname__}"
            if (cls.__module__ == module.__name__ and issubclass(cls, BaseException)
                    and not issubclass(cls, OrchestratorError) and where not in _INTERNAL_EXCEPTIONS):
                stray.append(where)
    assert modules > 40 and stray == []

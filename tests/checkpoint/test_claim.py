"""One run per checkpoint directory: the local flock and the object-store lease, and the write probe."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.checkpoint.claim import (LOCK_NAME, DirectoryInUseError, DirectoryLock, DirectoryNotWritableError, Holder,
                                           probe_writable)
from orchestrator.checkpoint.storage import Storage

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from orchestrator.checkpoint.claim import DirectoryLock
lock = DirectoryLock(sys.argv[1], owner="holder-run")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_local_lock_names_the_holder_and_is_released_when_it_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryInUseError) as info:
            DirectoryLock(str(tmp_path), owner="second").acquire()
        assert f"pid {holder.pid}" in str(info.value) and "holder-run" in str(info.value)
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up of any kind: the kernel releases the flock
        holder.wait(timeout=30)
        with DirectoryLock(str(tmp_path), owner="third"):
            pass
    finally:
        holder.kill()


def test_local_lock_is_exclusive_within_a_process_too(tmp_path):
    with DirectoryLock(str(tmp_path)):
        with pytest.raises(DirectoryInUseError):
            DirectoryLock(str(tmp_path)).acquire()
    with DirectoryLock(str(tmp_path)):  # released on exit
        pass


def test_a_directory_the_lock_made_is_removed_if_nothing_was_saved(tmp_path):
    with DirectoryLock(str(tmp_path / "new" / "ckpt")):
        assert (tmp_path / "new" / "ckpt" / LOCK_NAME).exists()
    assert not (tmp_path / "new").exists()
    with DirectoryLock(str(tmp_path / "kept")):
        (tmp_path / "kept" / "model.ckpt-1.index").write_bytes(b"x")
    assert sorted(os.listdir(tmp_path / "kept")) == [LOCK_NAME, "model.ckpt-1.index"]


def _lease(s3_options, url):
    storage, path = Storage.for_path(url, s3_options)
    return storage, Storage.join(path, LOCK_NAME)


def _plant(storage, path, *, host, pid, heartbeat):
    record = {"owner": "run 'other'", "host": host, "pid": pid, "token": "t" * 32, "started": heartbeat,
              "heartbeat": heartbeat}
    storage.write_bytes(path, json.dumps(record).encode())


def test_lease_of_a_dead_process_on_this_host_is_taken_at_once(s3_bucket, s3_options):
    import socket

    url = s3_bucket + "/ckpt"
    storage, path = _lease(s3_options, url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(storage, path, host=socket.gethostname(), pid=dead.pid, heartbeat=time.time())
    started = time.monotonic()
    with DirectoryLock(url, s3_options, owner="me", lease_timeout_s=600):
        assert json.loads(storage.read_bytes(path))["owner"] == "me"
    assert time.monotonic() - started < 60  # not the 600 s timeout
    assert not storage.exists(path)  # released: the lease object is gone


def test_fresh_lease_of_another_host_is_waited_for_then_taken_over(s3_bucket, s3_options, caplog):
    url = s3_bucket + "/ckpt"
    storage, path = _lease(s3_options, url)
    last_heartbeat = time.time()
    _plant(storage, path, host="elsewhere", pid=1, heartbeat=last_heartbeat)  # its driver died: no more heartbeats
    caplog.set_level(logging.WARNING, logger="orchestrator.checkpoint.claim")
    with DirectoryLock(url, s3_options, owner="me", lease_timeout_s=3):
        taken = time.time()
    assert taken - last_heartbeat >= 3  # it waited for the lease to go stale ...
    assert "waiting for the lease to expire" in caplog.text and "elsewhere" in caplog.text  # ... and said so
    assert "taking it over" in caplog.text


def test_live_lease_holder_makes_a_second_run_fail_naming_it(s3_bucket, s3_options):
    url = s3_bucket + "/ckpt"
    with DirectoryLock(url, s3_options, owner="first-run", lease_timeout_s=2):
        started = time.monotonic()
        with pytest.raises(DirectoryInUseError, match="first-run") as info:
            DirectoryLock(url, s3_options, owner="second-run", lease_timeout_s=2).acquire()
        assert f"pid {os.getpid()}" in str(info.value)
        assert time.monotonic() - started < 10  # the holder's heartbeat moved: no need to wait out the timeout


def test_probe_names_what_is_wrong(tmp_path, s3_server, s3_options):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DirectoryNotWritableError, match="is a file"):
        probe_writable(str(tmp_path / "file"))
    with pytest.raises(DirectoryNotWritableError, match="bucket does not exist"):
        probe_writable("s3://no-such-bucket-xyz/ckpt", s3_options)
    probe_writable(str(tmp_path / "new" / "ckpt"))
    assert not (tmp_path / "new").exists()  # the probe removed what it wrote, directories included
    (tmp_path / "old").mkdir()
    probe_writable(str(tmp_path / "old"))
    assert os.listdir(tmp_path / "old") == []


def test_lock_record_nested_past_the_recursion_limit_names_no_holder():
    # a lease object is read from a shared store: any bytes must parse to a holder or to None
    assert Holder.parse(b"[" * 100_000 + b"]" * 100_000) is None
    assert Holder.parse(b'{"owner": "x"}') is None


def test_a_symlink_or_directory_at_the_lock_path_is_refused_and_nothing_outside_is_written(tmp_path):
    # the lock file is truncated and rewritten: through a planted symlink that wrote a file elsewhere
    victim = tmp_path / "victim"
    victim.write_text("precious")
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / LOCK_NAME).symlink_to(victim)
    with pytest.raises(DirectoryNotWritableError, match=f"{LOCK_NAME}.*symlink"):
        DirectoryLock(str(directory)).acquire()
    assert victim.read_text() == "precious"
    (directory / LOCK_NAME).unlink()
    (directory / LOCK_NAME).mkdir()
    with pytest.raises(DirectoryNotWritableError, match=f"{LOCK_NAME}.*directory"):
        DirectoryLock(str(directory)).acquire()

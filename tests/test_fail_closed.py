"""Fail closed (issue 14), through the CLI as an operator or an attacker meets it.

Real components only: real ``orchestrator`` processes, a real local Ray, real files, real
signals, a real HTTP server on 127.0.0.1 that counts the requests it gets.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from orchestrator.checkpoint import writer
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from tests.test_cli import QUICKSTART, _progress_steps, _tensors, run_cli

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

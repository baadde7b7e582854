"""README's "Running on a Ray cluster" commands, end to end, against a real ``ray start --head``.

The commands are read from README.md and run as written, with this machine's values put in:
the head's ports (free ones, not Ray's defaults, so a cluster the developer runs is left alone),
``<head-ip>`` 127.0.0.1, and a local checkpoint directory for the S3 URL (one node). The head gets
its own temp dir; teardown ends exactly the processes of that cluster (those whose command line
names its temp dir, and their children), never ``ray stop``, which would end every Ray on the machine,
the suite's own included. ``ray job submit`` needs the Jobs API, i.e. the dashboard (``ray[default]``,
the ``cluster`` extra): when the dashboard cannot start, the test skips saying so.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.checkpoint.manager import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Running on a Ray cluster", 1)[1].split("\n## ", 1)[0]


def _commands() -> dict[str, str]:
    """The section's commands by what they do (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", _cluster_section(), flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [" ".join(line.split("#")[0].split()) for line in lines if line.strip() and not line.startswith("#")]
    found = {"install": [c for c in commands if c.startswith("pip install")],
             "head": [c for c in commands if c.startswith("ray start --head")],
             "token": [c for c in commands if c.startswith("export RAY_AUTH")],
             "submit": [c for c in commands if c.startswith("ray job submit")]}
    assert all(len(v) == 1 for v in found.values()), f"README's cluster section changed: {commands}"
    return {k: v[0] for k, v in found.items()}


def test_readme_cluster_section_installs_the_cluster_extra():
    """``ray job submit`` needs ray[default]: the README installs the extra that pulls it."""
    assert _commands()["install"] == 'pip install -e ".[cluster]"'
    extra = re.search(r"^cluster = \[(.*?)\]\s*(#.*)?$", (REPO / "pyproject.toml").read_text(), flags=re.M)
    assert extra and '"ray[default]' in extra.group(1)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (parent, cmdline)
    return table


def _cluster_pids(temp_dir: str) -> set[int]:
    """The processes whose command line names the cluster's temp dir, and their descendants."""
    table = _processes()
    ours, pid = set(), os.getpid()
    while pid in table and pid not in ours:  # this process and its ancestors are never the cluster's
        ours.add(pid)
        pid = table[pid][0]
    pids = {pid for pid, (_, cmdline) in table.items() if temp_dir in cmdline} - ours
    grew = True
    while grew:
        more = {pid for pid, (parent, _) in table.items() if parent in pids} - pids
        pids |= more
        grew = bool(more)
    return pids


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_cluster(temp_dir: str) -> None:
    """End this cluster's processes only, by pid (SIGTERM, then SIGKILL what is left after 2 s:
    gcs_server, raylet and their agents linger on SIGTERM for 10 s and more, and nothing of this
    throwaway cluster needs a graceful end)."""
    pids = _cluster_pids(temp_dir)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and pids & set(_processes()):
        time.sleep(0.2)
    _signal_all(pids & set(_processes()), signal.SIGKILL)


def _dashboard_up(url: str, deadline_s: float) -> bool:
    """True once the dashboard answers HTTP at all (401 included: Ray >= 2.59 may require its token)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.5)
    return False


@pytest.fixture
def head(tmp_path):
    """``ray start --head`` as README writes it, on free ports, its own temp dir; yields (env, ports)."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finding the cluster's processes to stop them needs Linux /proc")
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not on PATH")
    command = _commands()["head"]
    assert command == "ray start --head --port=6379", f"README's head command changed: {command}"
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")  # Unix socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = str(REPO)  # the job and its workers import this checkout
    args = command.replace("6379", str(gcs)).split() + [
        f"--temp-dir={temp_dir}", "--num-cpus=4", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", "--include-dashboard=true", "--disable-usage-stats"]
    try:
        started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        url = f"http://127.0.0.1:{dashboard}"
        if started.returncode != 0 or not _dashboard_up(url, 60):
            pytest.skip(f"the Ray dashboard (Jobs API) did not start, so `ray job submit` cannot run: "
                        f"install ray[default] (pip install -e \".[cluster]\"); ray start said: "
                        f"{(started.stdout + started.stderr)[-500:]}")
        yield env, {"gcs": gcs, "dashboard": dashboard}
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _head_token(env: dict) -> str:
    """What README says to copy: ``ray get-auth-token`` on the head (Ray < 2.52 has no tokens)."""
    proc = subprocess.run(["ray", "get-auth-token"], env=env, capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "none"


@pytest.mark.timeout(300)
def test_readme_ray_job_submit_runs_the_cluster_job(head, tmp_path):
    env, ports = head
    commands = _commands()
    token = commands["token"]
    assert token == "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the output of ray get-auth-token on the head>", token
    submit = commands["submit"]
    expected = ("ray job submit --address http://<head-ip>:8265 --working-dir . -- orchestrator train "
                "configs/cluster.yaml --set checkpoint.dir=s3://my-bucket/runs/digits")
    assert submit == expected, f"README's submit command changed: {submit}"
    ckpt = tmp_path / "ckpt"
    token = token.replace("<the output of ray get-auth-token on the head>", shlex.quote(_head_token(env)))
    submit = (submit.replace("<head-ip>:8265", f"127.0.0.1:{ports['dashboard']}")
              .replace("s3://my-bucket/runs/digits", str(ckpt)))
    submit += (f" --set train.steps={STEPS} --set checkpoint.save_every_steps=2 --set train.eval_every_steps=0"
               f" --set train.log_every_steps=2 --set model.hidden=[32] --set logging.progress=plain"
               f" --set run_dir={tmp_path / 'run'}")
    proc = subprocess.run(["bash", "-euc", f"{token}\n{submit}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=270)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert re.search(r"Job '[^']+' succeeded", output), output[-4000:]
    assert "Run summary: cluster_digits (completed)" in output
    assert [info.step for info in list_checkpoints(str(ckpt))] == [2, 4]

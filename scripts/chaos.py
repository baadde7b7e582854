"""Chaos test: train while injecting random real faults, then check the job survived.

Runs a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head without
CPUs plus three 1-CPU worker nodes), a real S3-protocol server (moto_server) as the
shared checkpoint store, then the job as an operator would: ``python -m orchestrator.cli
train`` in a subprocess joined to that cluster (M=2). One fault at a time:

* ``kill_worker``   SIGKILL of a training worker actor's process (found by its process title,
                    among the descendants of this cluster's raylets, and named in the
                    coordinator's latest ``workers:`` log line: a spare worker is not one);
* ``remove_node``   removal of a node hosting a worker (the third node keeps M=2, so
                    equality must hold); after the recovery a fresh node joins;
* ``sigterm_driver`` SIGTERM to the driver: emergency checkpoint, exit code 3, then the
                    same command is launched again and must resume;
* ``fail_shard_write`` a real failed write of one shard of a coming checkpoint: the S3
                    PUT of that data file is answered 403 AccessDenied by a proxy in
                    front of the server; the save fails, training continues, a later
                    save commits.

A fault is injected only after a checkpoint committed since the previous recovery, so
the job always progresses, and once the job's spare workers are up again (the
coordinator's ``spare worker up`` lines): each fault meets the job in its steady state.
Recovery time is measured from the injection to the first completed step after the restore (the driver's ``recovered in`` line, or the first step
line of a relaunched driver). Each recovery is broken down by kind of fault: detect
(injection to the driver's ``failure #`` line), then the runtime's own replace, restore
and first-step times, the steps lost and the tier restored from (parsed from the
``recovered in`` line). Finally the job's last checkpoint is compared, tensor by
tensor and bit for bit, with an uninterrupted run of the same config and M.

The job runs with ``fault_tolerance.spare_workers: 1`` (``--spare-workers``; 0: every
replacement starts a fresh process) and ``checkpoint.memory_every_steps`` from ``--memory-every``.

    python scripts/chaos.py --faults 4          # short: each kind once (the default test suite runs this)
    python scripts/chaos.py --faults 50         # long

Prints a result table; ``--markdown PATH`` also writes it as Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import http.server
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FAULT_KINDS = ("kill_worker", "remove_node", "sigterm_driver", "fail_shard_write")
WORKER_PROCESS_TITLE = b"ray::WorkerActor"
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")
RECOVERED_LINE = re.compile(r"recovered in ")
SPARE_UP_LINE = re.compile(r"\bspare worker up: pid \d+")
WORKERS_LINE = re.compile(r"\bworkers: ((?:\d+=\d+@\w+,?)+)")  # the coordinator's rank=pid@node line
FAILURE_LINE = re.compile(r"failure #\d+: ")
BREAKDOWN = re.compile(r"recovered in [\d.]+ s from (?P<tier>[\w ]+) \(detect (?P<detect>[\d.]+) s, "
                       r"replace (?P<replace>[\d.]+) s, restore (?P<restore>[\d.]+) s, first step "
                       r"(?P<first_step>[\d.]+) s; (?P<lost>\d+) steps? lost\)")
PHASES = ("detect", "replace", "restore", "first_step")
EXIT_PREEMPTED = 3


@dataclasses.dataclass
class FaultRecord:
    kind: str
    step: int
    recovered: bool = False
    recovery_s: float | None = None
    detail: str = ""
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # detect, replace, restore, first_step
    steps_lost: int | None = None
    tier: str | None = None


@dataclasses.dataclass
class ChaosResult:
    faults: list[FaultRecord]
    finished: bool
    identical: bool
    mismatches: list[str]
    steps: int
    wall_s: float

    @property
    def recovery_times(self) -> list[float]:
        return [f.recovery_s for f in self.faults if f.recovery_s is not None]


# ---------------------------------------------------------------- shared storage

class FaultProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy in front of the S3 server that fails PUTs of blocked keys with
    403 AccessDenied: a real failed write, as a client sees one (not retried)."""

    daemon_threads = True

    def __init__(self, upstream_port: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.blocked: set[str] = set()  # key suffixes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self.shutdown()  # waits for serve_forever, so only once it runs
        self.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after the chunk

    def _forward(self) -> None:
        body = self._body()
        key = self.path.split("?", 1)[0]
        if self.command == "PUT" and any(key.endswith(b) for b in self.server.blocked):
            return self._reply(403, b"<Error><Code>AccessDenied</Code>"
                                    b"<Message>chaos: shard write blocked</Message></Error>")
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("expect", "transfer-encoding", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        self._reply(response.status, payload, response.getheaders())
        conn.close()

    def _reply(self, status: int, payload: bytes, headers=()) -> None:
        self.send_response(status)
        length = str(len(payload))
        for name, value in headers:
            if name.lower() == "content-length" and self.command == "HEAD":
                length = value  # a HEAD answer has no body but tells the object's size
            elif name.lower() not in ("content-length", "transfer-encoding", "connection",
                                      "date", "server"):
                self.send_header(name, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class S3Storage:
    """A real S3-protocol server (moto_server) the nodes share, behind a FaultProxy.

    Nodes of a ``cluster_utils.Cluster`` share this machine's disk, but the runtime
    (rightly) refuses a local checkpoint path on a multi-node cluster, so the chaos job
    checkpoints to S3, as a real multi-node job would.
    """

    def __init__(self, bucket: str = "chaos"):
        self.port = _free_port()
        self.bucket = bucket
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proxy = FaultProxy(self.port)
        try:
            wait_until(self._listening, 30, "moto_server to listen", poll=0.1)
            self.proxy.start()
            self._create_bucket()
        except BaseException:
            self.shutdown()
            raise

    def _create_bucket(self) -> None:
        import s3fs

        # no region: s3fs would send LocationConstraint=us-east-1, which S3 rejects
        s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                          client_kwargs={"endpoint_url": f"http://127.0.0.1:{self.port}"}
                          ).mkdir(self.bucket)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def options(self, endpoint: str | None = None) -> dict:
        """storage_options; the job goes through the proxy, the checks go direct."""
        return {"key": "testing", "secret": "testing", "use_listings_cache": False,
                "client_kwargs": {"endpoint_url": endpoint or self.proxy.url,
                                  "region_name": "us-east-1"}}

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options(f"http://127.0.0.1:{self.port}"))

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def names(self, name: str) -> list[str]:
        """File names in the directory ``name`` of the bucket."""
        try:
            return [p.rsplit("/", 1)[1] for p in self.fs.ls(f"{self.bucket}/{name}",
                                                            refresh=True)]
        except FileNotFoundError:
            return []

    def shutdown(self) -> None:
        self.proxy.stop()
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the job's config

def write_config(path: Path, tag: str, work: Path, address: str, steps: int,
                 save_every: int, seed: int, store: "S3Storage", spares: int = 1,
                 memory_every: int = 0) -> Path:
    """A digits-MLP job with M=2 (min=max, so the math is the same with or without faults),
    ``spares`` spare workers and memory-only checkpoints every ``memory_every`` steps."""
    options = json.dumps(store.options())  # JSON is YAML
    path.write_text(f"""\
name: chaos-{tag}
run_dir: {work / ('run-' + tag)}
seed: {seed}
model: {{kind: mlp, hidden: [64], keep_prob_input: 0.9, keep_prob_hidden: 0.8}}
data: {{dataset: digits, global_batch_size: 64}}
optimizer: {{name: rmsprop, learning_rate: 0.001}}
train: {{steps: {steps}, log_every_steps: 1, eval_every_steps: 0}}
workers: {{min: 2, max: 2}}
resources: {{cpus_per_worker: 1}}
checkpoint: {{dir: "{store.url('ckpt-' + tag)}", storage_options: {options},
             save_every_steps: {save_every}, max_to_keep: 3, async_save: true,
             memory_every_steps: {memory_every}}}
fault_tolerance: {{max_failures: -1, backoff_s: 0.0, step_timeout_s: 60, grace_period_s: 30,
                  min_workers_timeout_s: 60, spare_workers: {spares}}}
resume: auto
cluster: {{address: "{address}"}}
logging: {{level: info, progress: plain, tensorboard: false}}
""")
    return path


# ---------------------------------------------------------------- the driver subprocess

class Driver:
    """``python -m orchestrator.cli train CONFIG``; its stdout is timestamped line by line."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log = config, log
        self.proc: subprocess.Popen | None = None
        self.launches = 0
        self.lines: list[tuple[float, int, str]] = []  # (time, launch number, text)
        self._lock = threading.Lock()

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "train", str(self.config)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.launches += 1
        threading.Thread(target=self._read, args=(self.proc, self.launches),
                         daemon=True).start()

    def _read(self, proc: subprocess.Popen, launch: int) -> None:
        with open(self.log, "a") as log:
            for line in proc.stdout:
                log.write(line)
                with self._lock:
                    self.lines.append((time.monotonic(), launch, line.rstrip("\n")))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def first_line_after(self, since: float, pattern: re.Pattern,
                         launch: int | None = None) -> float | None:
        """Time of the first line matching ``pattern`` printed after ``since`` (by the
        given launch of the driver, or any)."""
        found = self.first_match_after(since, pattern, launch)
        return None if found is None else found[0]

    def first_match_after(self, since: float, pattern: re.Pattern,
                          launch: int | None = None) -> tuple[float, re.Match] | None:
        """(time, match) of the first line matching ``pattern`` printed after ``since``."""
        with self._lock:
            for t, n, line in self.lines:
                match = pattern.search(line) if t >= since and (launch is None or n == launch) else None
                if match:
                    return t, match
        return None

    def training_pids(self) -> set[int]:
        """The training workers' pids, from the coordinator's latest ``workers:`` line (spare
        workers run as the same actor class but are not training)."""
        with self._lock:
            for _, _, line in reversed(self.lines):
                match = WORKERS_LINE.search(line)
                if match:
                    return {int(item.split("=")[1].split("@")[0]) for item in match.group(1).split(",")}
        return set()

    def spares_up(self) -> int:
        """Spare workers that came up since the coordinator's latest ``workers:`` line."""
        with self._lock:
            count = 0
            for _, _, line in reversed(self.lines):
                if WORKERS_LINE.search(line):
                    return count
                count += bool(SPARE_UP_LINE.search(line))
        return 0

    def last_step(self) -> int:
        with self._lock:
            for _, _, line in reversed(self.lines):
                match = STEP_LINE.search(line)
                if match:
                    return int(match.group(1))
        return 0


def run_uninterrupted(config: Path, log: Path, timeout: float) -> int:
    driver = Driver(config, log)
    driver.start()
    return driver.wait(timeout)


# ---------------------------------------------------------------- the cluster

class ChaosCluster:
    """A head with no CPUs (the driver's coordinator runs there) and worker nodes."""

    def __init__(self, worker_nodes: int, cpus_per_node: int):
        from ray.cluster_utils import Cluster

        self.cpus_per_node = cpus_per_node
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False})
        self.nodes = [self.cluster.add_node(num_cpus=cpus_per_node)
                      for _ in range(worker_nodes)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def remove_node(self, node) -> None:
        self.cluster.remove_node(node)
        self.nodes.remove(node)

    def add_node(self) -> None:
        self.nodes.append(self.cluster.add_node(num_cpus=self.cpus_per_node))

    def worker_pids(self) -> dict[int, object]:
        """Live worker actor processes of THIS cluster (other Ray instances on the machine
        run processes with the same title), each with its node."""
        raylets = {_raylet_pid(node): node for node in self.nodes}
        found = {}
        for pid in _titled_processes(WORKER_PROCESS_TITLE):
            node = next((raylets[a] for a in _ancestors(pid) if a in raylets), None)
            if node is not None:
                found[pid] = node
        return found

    def shutdown(self) -> None:
        self.cluster.shutdown()


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid
        chain.append(pid)
    return chain


def _titled_processes(title: bytes) -> list[int]:
    """PIDs whose command line starts with ``title`` (Ray sets actor process titles)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(title):
            pids.append(int(entry.name))
    return sorted(pids)


# ---------------------------------------------------------------- checkpoints

class CheckpointDir:
    """One job's checkpoint directory in the shared store."""

    def __init__(self, store: S3Storage, name: str):
        self.store, self.name = store, name
        self.url = store.url(name)

    def committed_steps(self) -> list[int]:
        """Steps of the committed checkpoints (an ``.index`` file is the commit point)."""
        return sorted(int(m.group(1)) for n in self.store.names(self.name)
                      if (m := re.match(r"model\.ckpt-(\d+)\.index$", n)))

    def latest(self) -> int:
        return max(self.committed_steps(), default=0)

    def final_prefix(self) -> str | None:
        from orchestrator.checkpoint.state import latest_checkpoint

        return latest_checkpoint(self.url, storage_options=self.store.options())


def compare_checkpoints(a: str, b: str, options: dict) -> list[str]:
    """Names of tensors that differ (bit for bit) between two checkpoints."""
    import numpy as np

    from orchestrator.checkpoint.reader import CheckpointReader

    ra, rb = CheckpointReader(a, options), CheckpointReader(b, options)
    names_a, names_b = set(ra.get_variable_to_shape_map()), set(rb.get_variable_to_shape_map())
    diffs = sorted(names_a ^ names_b)
    for name in sorted(names_a & names_b):
        x, y = ra.get_tensor(name), rb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            if not (x.dtype == object and np.array_equal(x, y)):
                diffs.append(name)
    return diffs


# ---------------------------------------------------------------- the faults

class Injector:
    """Injects one fault of a kind and tells how to recognise the recovery."""

    def __init__(self, cluster: ChaosCluster, driver: Driver, ckpt: CheckpointDir,
                 save_every: int, rng: random.Random):
        self.cluster, self.driver, self.ckpt = cluster, driver, ckpt
        self.save_every, self.rng = save_every, rng
        self.blocked_step: int | None = None
        self.nodes_removed = 0

    def inject(self, kind: str) -> str:
        return getattr(self, kind)()

    def _pick_worker(self) -> tuple[int, object]:
        training = self.driver.training_pids()
        workers = {pid: node for pid, node in self.cluster.worker_pids().items() if pid in training}
        if not workers:
            raise RuntimeError("no worker actor process found in the chaos cluster")
        pid = self.rng.choice(sorted(workers))
        return pid, workers[pid]

    def kill_worker(self) -> str:
        pid, _ = self._pick_worker()
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL pid {pid}"

    def remove_node(self) -> str:
        pid, node = self._pick_worker()
        self.cluster.remove_node(node)
        self.nodes_removed += 1
        return f"removed node {node.node_id[:8]} (hosting worker pid {pid})"

    def replace_removed_nodes(self) -> None:
        """After the recovery: a fresh machine joins, so capacity stays for later faults."""
        for _ in range(self.nodes_removed):
            self.cluster.add_node()
        self.nodes_removed = 0

    def sigterm_driver(self) -> str:
        pid = self.driver.proc.pid
        self.driver.proc.send_signal(signal.SIGTERM)
        code = self.driver.wait(timeout=120)
        if code != EXIT_PREEMPTED:
            raise RuntimeError(f"driver exited with {code} after SIGTERM, expected "
                               f"{EXIT_PREEMPTED}")
        self.driver.start()
        return f"SIGTERM driver pid {pid} -> exit {code}, relaunched"

    def fail_shard_write(self) -> str:
        # two intervals ahead: the next save may already be writing its shards
        step = (self.driver.last_step() // self.save_every + 2) * self.save_every
        shard = self.rng.randrange(2)
        key = f"/{self.ckpt.store.bucket}/{self.ckpt.name}/model.ckpt-{step}.data-{shard:05d}-of-00002"
        self.ckpt.store.proxy.blocked.add(key)
        self.blocked_step = step
        return f"blocked the S3 PUT of shard {shard} of step {step}"

    def clear_passed_blockers(self) -> None:
        """Unblocks the writes once a later checkpoint committed."""
        if self.blocked_step is not None and self.ckpt.latest() > self.blocked_step:
            self.ckpt.store.proxy.blocked.clear()
            self.blocked_step = None


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def await_recovery(record: FaultRecord, driver: Driver, ckpt: CheckpointDir, injected: float,
                   timeout: float, blocked_step: int | None = None) -> None:
    """Recovered = the job trains again after the fault. For a failed shard write: the
    blocked save was not committed and a later checkpoint was."""
    if record.kind == "fail_shard_write":
        wait_until(lambda: ckpt.latest() > blocked_step or not driver.running(), timeout,
                   "a commit after the failed write", poll=0.2)
        steps = ckpt.committed_steps()
        record.recovered = blocked_step not in steps and max(steps) > blocked_step
        return
    if record.kind == "sigterm_driver":  # the relaunched driver's first step
        pattern, launch = STEP_LINE, driver.launches
    else:
        pattern, launch = RECOVERED_LINE, None
    wait_until(lambda: driver.first_line_after(injected, pattern, launch) is not None
               or not driver.running(), timeout, f"recovery from {record.kind}")
    seen = driver.first_line_after(injected, pattern, launch)
    record.recovered = seen is not None
    record.recovery_s = None if seen is None else seen - injected
    if record.kind != "sigterm_driver":
        _read_breakdown(record, driver, injected)


def _read_breakdown(record: FaultRecord, driver: Driver, injected: float) -> None:
    """Detect from the injection to the driver's failure line; the rest from its recovery line."""
    failed = driver.first_line_after(injected, FAILURE_LINE)
    found = driver.first_match_after(injected, BREAKDOWN)
    if failed is None or found is None:
        return
    match = found[1]
    record.phases = {"detect": failed - injected,
                     **{p: float(match.group(p)) for p in PHASES if p != "detect"}}
    record.steps_lost = int(match.group("lost"))
    record.tier = match.group("tier").strip().replace(" ", "_")


def chaos_run(cluster: ChaosCluster, config: Path, ckpt: CheckpointDir, log: Path, faults: int,
              save_every: int, steps: int, rng: random.Random,
              timeout: float, spares: int = 0) -> list[FaultRecord]:
    driver = Driver(config, log)
    driver.start()
    injector = Injector(cluster, driver, ckpt, save_every, rng)
    records: list[FaultRecord] = []
    kinds = _schedule(faults, rng)
    for kind in kinds:
        if not _await_next_commit(driver, ckpt, timeout):
            break
        wait_until(lambda: driver.spares_up() >= spares or not driver.running(), timeout,
                   "the job's spare workers to be up", poll=0.1)  # steady state: the spares replaced
        if driver.last_step() >= steps - 3 * save_every:
            break  # too close to the end to see a recovery (or a blocked save) happen
        time.sleep(rng.uniform(0.0, 0.3))
        step = driver.last_step()
        injected = time.monotonic()
        record = FaultRecord(kind, step, detail=injector.inject(kind))
        records.append(record)
        await_recovery(record, driver, ckpt, injected, timeout, injector.blocked_step)
        injector.replace_removed_nodes()
        injector.clear_passed_blockers()
        print(f"  fault {len(records)}: {kind} at step {step}: {record.detail}; "
              f"recovered={record.recovered} in {_fmt(record.recovery_s)}", flush=True)
    code = driver.wait(timeout)
    injector.clear_passed_blockers()
    if code != 0:
        raise RuntimeError(f"chaos driver exited with {code}; see {log}")
    return records


def _schedule(faults: int, rng: random.Random) -> list[str]:
    """Every kind at least once (when there are enough faults), the rest random."""
    kinds = list(FAULT_KINDS[:faults])
    kinds += [rng.choice(FAULT_KINDS) for _ in range(faults - len(kinds))]
    rng.shuffle(kinds)
    return kinds


def _await_next_commit(driver: Driver, ckpt: CheckpointDir, timeout: float) -> bool:
    before = ckpt.latest()
    wait_until(lambda: ckpt.latest() > before or not driver.running(), timeout,
               "the next checkpoint commit", poll=0.2)
    return driver.running()


# ---------------------------------------------------------------- report

def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def kind_table(result: ChaosResult) -> str:
    """Recovery by kind of fault: median (and max) of the total and of each phase, steps lost, tiers."""
    head = ("| fault kind | recovered | median (max) | detect | replace | restore | first step "
            "| steps lost (median, max) | restored from |")
    lines = [head, "|" + "---|" * 9]
    for kind in FAULT_KINDS:
        faults = [f for f in result.faults if f.kind == kind]
        if faults:
            lines.append("| " + " | ".join(_kind_row(kind, faults)) + " |")
    return "\n".join(lines)


def _kind_row(kind: str, faults: list[FaultRecord]) -> list[str]:
    totals = [f.recovery_s for f in faults if f.recovery_s is not None]
    phased = [f for f in faults if f.phases]
    lost = [f.steps_lost for f in phased]
    tiers: dict[str, int] = {}
    for f in phased:
        tiers[f.tier] = tiers.get(f.tier, 0) + 1
    row = [kind, f"{sum(f.recovered for f in faults)}/{len(faults)}",
           f"{_fmt(statistics.median(totals))} ({_fmt(max(totals))})" if totals else "-"]
    row += [_fmt(statistics.median(f.phases[p] for f in phased)) if phased else "-" for p in PHASES]
    row.append(f"{statistics.median(lost):g}, {max(lost)}" if lost else "-")
    row.append(", ".join(f"{t} {n}" for t, n in sorted(tiers.items())) or "-")
    return row


def result_table(result: ChaosResult) -> str:
    times = result.recovery_times
    by_kind = {k: [f for f in result.faults if f.kind == k] for k in FAULT_KINDS}
    rows = [("faults injected", str(len(result.faults))),
            ("faults recovered", str(sum(f.recovered for f in result.faults)))]
    rows += [(f"  {k}", f"{sum(f.recovered for f in fs)}/{len(fs)}")
             for k, fs in by_kind.items()]
    rows += [("recovery median", _fmt(statistics.median(times)) if times else "-"),
             ("recovery max", _fmt(max(times)) if times else "-"),
             ("job finished", "yes" if result.finished else "no"),
             ("final state bit-identical to uninterrupted run",
              "yes" if result.identical else f"NO ({', '.join(result.mismatches[:5])})"),
             ("steps", str(result.steps)),
             ("wall time", f"{result.wall_s:.1f} s")]
    return "\n".join(["| metric | value |", "|---|---|"] +
                     [f"| {name} | {value} |" for name, value in rows])


# ---------------------------------------------------------------- main

def run_chaos(faults: int, steps: int, save_every: int, seed: int, work: Path,
              timeout: float, spares: int = 1, memory_every: int = 0) -> ChaosResult:
    rng = random.Random(seed)
    started = time.monotonic()
    store = S3Storage()
    cluster = None
    try:
        cluster = ChaosCluster(worker_nodes=3, cpus_per_node=1)
        reference = _run_reference(cluster, store, work, steps, save_every, seed, timeout)
        chaos = CheckpointDir(store, "ckpt-chaos")
        cfg = write_config(work / "chaos.yaml", "chaos", work, cluster.address, steps,
                           save_every, seed, store, spares, memory_every)
        records = chaos_run(cluster, cfg, chaos, work / "chaos.log", faults, save_every,
                            steps, rng, timeout, spares)
        ref, got = reference.final_prefix(), chaos.final_prefix()
        mismatches = (compare_checkpoints(ref, got, store.options()) if ref and got
                      else ["<no final checkpoint>"])
    finally:
        if cluster is not None:
            cluster.shutdown()
        store.shutdown()
    finished = got is not None and got.endswith(f"-{steps}")
    return ChaosResult(records, finished, not mismatches, mismatches, steps,
                       time.monotonic() - started)


def _run_reference(cluster, store, work, steps, save_every, seed, timeout) -> CheckpointDir:
    config = write_config(work / "reference.yaml", "reference", work, cluster.address, steps,
                          save_every, seed, store, spares=0)
    code = run_uninterrupted(config, work / "reference.log", timeout)
    if code != 0:
        raise RuntimeError(f"uninterrupted run exited with {code}; see {work / 'reference.log'}")
    return CheckpointDir(store, "ckpt-reference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: enough for the faults)")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--spare-workers", type=int, default=1,
                        help="fault_tolerance.spare_workers of the chaos job (0: replacements start fresh)")
    parser.add_argument("--memory-every", type=int, default=0, help="checkpoint.memory_every_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=180.0, help="per wait, seconds")
    parser.add_argument("--workdir", default=None, help="kept after the run when given")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    # Faults are paced by commits and recoveries (wall time), so a fast machine trains more steps between
    # two faults: leave room for every fault to land before the last 3 saves, where none is injected.
    steps = args.steps or args.save_every * (16 * args.faults + 6)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    result = run_chaos(args.faults, steps, args.save_every, args.seed, work, args.timeout,
                       args.spare_workers, args.memory_every)
    table = result_table(result) + "\n\n" + kind_table(result)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    ok = result.finished and result.identical and all(f.recovered for f in result.faults)
    return 0 if ok and len(result.faults) == args.faults else 1


if __name__ == "__main__":
    sys.exit(main())

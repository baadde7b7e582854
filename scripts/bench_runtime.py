"""Benchmarks of the Ray runtime (issue 5), each printed from one run:

(a) training stall per checkpoint, async vs synchronous save, for a wide MLP of >= 200 MB;
(b) aggregate checkpoint write throughput with M = 1, 2, 4 writers vs a raw write+fsync of the
    same bytes to the same disk;
(c) training steps/second with M = 1, 2, 4 (the 784-625-625-10 reference MLP, batch 128), each
    step split into compute (the engine), communication and orchestration, and the ratio M/1;
(d) side by side with Ray Train + PyTorch DDP (gloo backend) doing the same work: the same MLP,
    global batch 128 split over the same M workers, SGD, synthetic data, one thread per worker.
    Needs the ``bench`` extra (torch, ray[train]);
(e) the transport alone, M=2, the bytes one step of that MLP moves (each rank's gradients for the other
    owner, then each owner's parameters), no compute: a Ray Compiled Graph (``ray.dag``, shared-memory
    channels, one ``execute`` per step from the driver) vs the workers' own exchange running K steps per
    call (shared memory on one node; TCP, as between nodes);
(f) the machine's ceiling for (c): one process doing the whole batch vs two independent processes (no Ray, no
    exchange) each doing half with ``engine.step.TrainStep`` and updating the share of the variables its rank
    owns at M=2, one BLAS thread each: no M=2 can beat that ratio.

    python scripts/bench_runtime.py [--model-mb 200] [--workers 1 2 4] [--dir /tmp/bench]

Everything runs on an in-process local Ray with one BLAS thread per worker
(OMP/OPENBLAS/MKL_NUM_THREADS=1); checkpoints are fsync'd.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from orchestrator.cluster.coordinator import Coordinator  # noqa: E402
from orchestrator.config import (CheckpointConfig, DataConfig, Dataset, JobConfig, ModelConfig,  # noqa: E402
                                 OptimizerConfig, OptimizerName, ResourcesConfig, TrainConfig)

INPUT_DIM = 1024
WARMUP_STEPS = 10
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def wide_hidden(model_mb: float) -> int:
    """Width H of a 1024-H-H-10 MLP whose float32 parameters take ``model_mb`` MB."""
    floats = model_mb * 1e6 / 4
    b = INPUT_DIM + 10 + 2  # H^2 + (1024 + 10 + 2) H + 10 = floats
    return int((-b + (b * b + 4 * (floats - 10)) ** 0.5) / 2) + 1


def job(directory: str, workers: int, hidden: list[int], input_dim: int, batch: int, steps: int,
        async_save: bool = True) -> JobConfig:
    return JobConfig(
        name="bench", seed=0,
        model=ModelConfig(hidden=hidden, keep_prob_input=1.0, keep_prob_hidden=1.0),
        data=DataConfig(dataset=Dataset.SYNTHETIC, num_examples=max(512, batch * 4), input_dim=input_dim,
                        global_batch_size=batch),
        optimizer=OptimizerConfig(name=OptimizerName.SGD, learning_rate=1e-3),
        train=TrainConfig(steps=steps, log_every_steps=10**9, eval_every_steps=0),
        workers=workers, resources=ResourcesConfig(cpus_per_worker=0.25),
        # saves are started by hand; the hourly periodic one never comes in a benchmark
        checkpoint=CheckpointConfig(dir=directory, save_every_steps=0, save_every_secs=3600.0,
                                    async_save=async_save, max_to_keep=2, fsync=True),
        resume="never")


def started(config: JobConfig) -> Coordinator:
    coordinator = Coordinator(config)
    coordinator.start()
    return coordinator


def mean_step_time(coordinator: Coordinator, steps: int) -> float:
    """Seconds per step of ``steps`` steps run as in a job (chunks of steps inside the workers)."""
    begin = time.perf_counter()
    coordinator.advance(steps)
    return (time.perf_counter() - begin) / steps


# ------------------------------------------------------------------------------ (a)
def bench_stall(root: str, model_mb: float, workers: int, rounds: int) -> None:
    hidden = wide_hidden(model_mb)
    config = job(os.path.join(root, "stall"), workers, [hidden, hidden], INPUT_DIM, batch=16, steps=10**6)
    coordinator = started(config)
    try:
        mean_step_time(coordinator, 2)  # warm-up: first transfers through the object store
        baseline = mean_step_time(coordinator, 3)
        sync_stalls, async_stalls, async_totals, during = [], [], [], []
        for _ in range(rounds):
            sync_stalls.append(coordinator.save(synchronous=True).stall_s)
            record = coordinator.save(synchronous=False)
            async_stalls.append(record.stall_s)
            during.append(mean_step_time(coordinator, 2))  # steps while the shards are written
            coordinator.finish_save()
            async_totals.append(record.total_s)
            mean_step_time(coordinator, 1)
        nbytes = coordinator.saves[-1].nbytes
    finally:
        coordinator.shutdown()
    sync_s, async_s = statistics.median(sync_stalls), statistics.median(async_stalls)
    print(f"(a) stall per checkpoint: model {nbytes / 1e6:.0f} MB (1024-{hidden}-{hidden}-10, sgd), "
          f"M={workers} workers, {rounds} saves of each kind in one run (medians)")
    print(f"    synchronous save: training blocked {sync_s:.3f} s")
    print(f"    async save:       training blocked {async_s:.3f} s (the host copy overlaps the next "
          f"gradient computation); write+commit {statistics.median(async_totals):.3f} s in the background")
    print(f"    async stall / sync stall = {async_s / sync_s:.3f} (target <= 0.05): "
          f"{'MET' if async_s <= 0.05 * sync_s else 'MISSED'}")
    print(f"    step time: {baseline:.3f} s normally, {statistics.median(during):.3f} s while a "
          f"background write runs (2 shared CPU cores)")


# ------------------------------------------------------------------------------ (b)
def raw_write_seconds(directory: str, nbytes: int, chunk: int = 16 << 20) -> float:
    """Plain sequential write + fsync of ``nbytes`` in large chunks (the disk's bandwidth)."""
    path = os.path.join(directory, "raw.bin")
    block = os.urandom(chunk)
    begin = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:min(left, chunk)])
            left -= chunk
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - begin
    os.remove(path)
    return seconds


def bench_throughput(root: str, model_mb: float, worker_counts: list[int], repeats: int) -> None:
    hidden = wide_hidden(model_mb)
    print(f"(b) checkpoint write throughput, synchronous saves (shards in parallel + index + state), "
          f"fsync on, best of {repeats}")
    for workers in worker_counts:
        directory = os.path.join(root, f"tput{workers}")
        config = job(directory, workers, [hidden, hidden], INPUT_DIM, batch=8, steps=10**6, async_save=False)
        coordinator = started(config)
        try:
            coordinator.step_once()
            records = [coordinator.save(synchronous=True) for _ in range(repeats)]
        finally:
            coordinator.shutdown()
        best = min(r.total_s for r in records)
        nbytes = records[-1].nbytes
        raw = min(raw_write_seconds(root, nbytes) for _ in range(repeats))
        print(f"    M={workers}: {nbytes / best / 1e9:.3f} GB/s ({nbytes / 1e6:.0f} MB in {best:.3f} s); "
              f"raw write+fsync {nbytes / raw / 1e9:.3f} GB/s; ratio {raw / best:.2f}")
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------ (c)
@dataclasses.dataclass
class StepSplit:
    """Mean per-step seconds of one measured stretch, split by where the time went."""

    workers: int
    step_s: float
    compute_s: float        # the engine: gather, forward, backward, in-order sum, update
    communication_s: float  # moving gradients and parameters inside the workers
    orchestration_s: float  # the rest: driver round trips, Ray task submission, serialization, transfers

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.step_s


def worker_timings(coordinator: Coordinator) -> list:
    return ray.get([w.step_timings.remote() for w in coordinator.workers], timeout=120)


def measure_split(coordinator: Coordinator, steps: int) -> StepSplit:
    """Time ``steps`` steps from the driver; split them with the workers' own timings."""
    before = worker_timings(coordinator)
    step_s = mean_step_time(coordinator, steps)
    after = worker_timings(coordinator)
    per_rank = [((a.compute_s - b.compute_s) / steps, (a.exchange_s - b.exchange_s) / steps)
                for a, b in zip(after, before)]
    compute, communication = max(per_rank, key=sum)  # the busiest rank is the step's critical path
    return StepSplit(len(per_rank), step_s, compute, communication,
                     max(0.0, step_s - compute - communication))


def bench_steps(root: str, worker_counts: list[int], steps: int) -> list[StepSplit]:
    print(f"(c) training throughput, 784-625-625-10 MLP, synthetic data, global batch 128, sgd, one BLAS "
          f"thread per worker; steady state: mean over {steps} steps after {WARMUP_STEPS} warm-up steps")
    splits = []
    for workers in worker_counts:
        config = job(os.path.join(root, f"steps{workers}"), workers, [625, 625], 784, batch=128, steps=10**6)
        coordinator = started(config)
        try:
            mean_step_time(coordinator, WARMUP_STEPS)
            splits.append(measure_split(coordinator, steps))
        finally:
            coordinator.shutdown()
    base = splits[0].steps_per_s
    print("    | M | steps/s | vs M=1 | step ms | compute ms | communication ms | orchestration ms |")
    for s in splits:
        print(f"    | {s.workers} | {s.steps_per_s:.1f} | {s.steps_per_s / base:.2f}x | {s.step_s * 1e3:.2f} | "
              f"{s.compute_s * 1e3:.2f} | {s.communication_s * 1e3:.2f} | {s.orchestration_s * 1e3:.2f} |")
    return splits


# ------------------------------------------------------------------------------ (d)
def ddp_loop(config: dict) -> None:
    """One Ray Train worker: the 784-625-625-10 MLP under DDP (gloo), its share of batch 128, SGD."""
    import torch
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(784, 625), torch.nn.ReLU(), torch.nn.Linear(625, 625), torch.nn.ReLU(),
        torch.nn.Linear(625, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    local = 128 // world + (1 if rank < 128 % world else 0)
    generator = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, local, 784, generator=generator), torch.randint(0, 10, (4, local), generator=generator)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    def steps(count: int) -> float:
        begin = time.perf_counter()
        for i in range(count):
            optimizer.zero_grad(set_to_none=True)
            (loss_fn(model(x[i % 4]), y[i % 4]) / 128).backward()
            optimizer.step()
        return time.perf_counter() - begin

    steps(config["warmup"])
    step_s = steps(config["steps"]) / config["steps"]
    with open(os.path.join(config["out"], f"rank{rank}.txt"), "w") as f:  # Ray Train's Result may hold no metrics
        f.write(repr(step_s))


def bench_ddp(root: str, workers: int, steps: int, ours: StepSplit) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = os.path.join(root, "ddp_times")
    os.makedirs(out, exist_ok=True)
    trainer = TorchTrainer(ddp_loop, train_loop_config={"warmup": WARMUP_STEPS, "steps": steps, "out": out},
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.25}),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(storage_path=os.path.join(root, "ray_train"), name="ddp"))
    trainer.fit()
    theirs = max(float(open(os.path.join(out, f"rank{r}.txt")).read()) for r in range(workers))
    print(f"(d) side by side, M={workers}, same MLP / batch 128 / SGD / synthetic data / 1 thread per worker:")
    print(f"    orchestrator (c): {ours.steps_per_s:.1f} steps/s; Ray Train + PyTorch DDP (gloo): "
          f"{1 / theirs:.1f} steps/s (timed inside its training loop, {steps} steps after {WARMUP_STEPS})")
    print(f"    ours / theirs = {theirs / ours.step_s:.2f}x (target >= 1.0x): "
          f"{'MET' if ours.step_s <= theirs else 'MISSED'}")


# ------------------------------------------------------------------------------ (e)
MLP_FLOATS = 784 * 625 + 625 + 625 * 625 + 625 + 625 * 10 + 10


class _DagPeer:
    """One rank in the compiled graph: hands out the other owner's gradients, sums what it owns, installs
    the other owner's parameters."""

    def __init__(self, floats: int):
        self.grads = np.ones(floats, np.float32)
        self.params = np.zeros(floats, np.float32)
        self.others = np.zeros(floats, np.float32)

    def grads_for_peer(self, step: int) -> np.ndarray:
        return self.grads

    def reduce(self, step: int, received: np.ndarray) -> np.ndarray:
        np.add(self.grads, received, out=self.params)
        return self.params

    def install(self, params: np.ndarray) -> int:
        self.others[...] = params
        return 0


class _LoopPeer:
    """One rank running the same exchange itself, ``count`` steps per call."""

    def __init__(self, rank: int, floats: int, shared_memory: bool):
        from orchestrator.checkpoint.variables import Variable
        from orchestrator.cluster.exchange import SocketExchange
        from orchestrator.cluster.ownership import assign_owners

        self.rank = rank
        self.variables = {n: Variable(n, np.zeros(floats, np.float32)) for n in ("a", "b")}
        ownership = assign_owners({n: v.nbytes for n, v in self.variables.items()}, 2)
        self.owned = ownership.owned_by(rank)
        self.grads = {n: np.ones(floats, np.float32) for n in self.variables}
        self.exchange = SocketExchange(rank, 2, self.variables, ownership, 60.0, "127.0.0.1",
                                       node="one", shared_memory=shared_memory)

    def address(self) -> dict:
        return self.exchange.address()

    def connect(self, addresses: list) -> str:
        self.exchange.connect(addresses)
        return self.exchange.mode

    def steps(self, first: int, count: int) -> None:
        for step in range(first, first + count):
            totals = self.exchange.reduce(step, self.grads, self.owned)
            for name in self.owned:
                np.copyto(self.variables[name].value, totals[name])
            self.exchange.share(step, 0.0)


def bench_transport(steps: int) -> None:
    from ray.dag import InputNode, MultiOutputNode

    floats = MLP_FLOATS // 2
    options = {"num_cpus": 0.25}
    peers = [ray.remote(_DagPeer).options(**options).remote(floats) for _ in range(2)]
    with InputNode() as step:
        sent = [p.grads_for_peer.bind(step) for p in peers]
        params = [peers[j].reduce.bind(step, sent[1 - j]) for j in range(2)]
        dag = MultiOutputNode([peers[j].install.bind(params[1 - j]) for j in range(2)])
    compiled = dag.experimental_compile()
    try:
        def run_dag(count: int) -> float:
            begin = time.perf_counter()
            for i in range(count):
                ray.get(compiled.execute(i), timeout=60)
            return (time.perf_counter() - begin) / count

        run_dag(WARMUP_STEPS)
        results = {"compiled graph (driver executes every step)": run_dag(steps)}
    finally:
        compiled.teardown()
        for peer in peers:
            ray.kill(peer)
    for shared_memory in (True, False):
        loop = [ray.remote(_LoopPeer).options(**options).remote(r, floats, shared_memory) for r in range(2)]
        addresses = ray.get([p.address.remote() for p in loop], timeout=60)
        mode = ray.get([p.connect.remote(addresses) for p in loop], timeout=60)[0]
        ray.get([p.steps.remote(0, WARMUP_STEPS) for p in loop], timeout=120)
        begin = time.perf_counter()
        ray.get([p.steps.remote(WARMUP_STEPS, steps) for p in loop], timeout=600)
        results[f"workers' own loop, exchange over {mode}"] = (time.perf_counter() - begin) / steps
        for peer in loop:
            ray.kill(peer)
    print(f"(e) transport alone, M=2: {2 * floats * 4 / 1e6:.2f} MB of gradients and parameters in and out of each "
          f"rank per step, no compute; mean of {steps} steps")
    for label, seconds in results.items():
        print(f"    {label}: {seconds * 1e3:.2f} ms/step")


# ------------------------------------------------------------------------------ (f)
def _independent_steps(rank: int, world: int, steps: int, results) -> None:
    from orchestrator.cluster.ownership import assign_owners
    from orchestrator.engine.backend import get_backend
    from orchestrator.engine.data import Sampler
    from orchestrator.engine.models import ModelSpec, build_model
    from orchestrator.engine.optimizers import make_optimizer
    from orchestrator.engine.step import LocalExchange, TrainStep

    model = build_model(ModelSpec(input_dim=784, hidden=[625, 625], num_classes=10, keep_prob_input=1.0,
                                  keep_prob_hidden=1.0), get_backend("cpu"), 0)
    optimizer = make_optimizer("sgd", 1e-3)
    rng = np.random.default_rng(rank)
    x, y = rng.random((512, 784), dtype=np.float32), rng.integers(0, 10, 512)
    # the share of the update this rank makes at M=world (the runtime's own ownership map)
    owned = assign_owners({v.name: v.nbytes for v in model.variables}, world).owned_by(rank)
    step = TrainStep(model, optimizer, Sampler(512, 128, 0), x, y, seed=0, global_batch_size=128,
                     owned=owned,
                     slots={v.name: optimizer.create_slots(v) for v in model.variables}, rank=rank, world=world)
    exchange = LocalExchange()
    for i in range(WARMUP_STEPS):
        step(i, exchange)
    begin = time.perf_counter()
    for i in range(steps):
        step(i, exchange)
    results.put((time.perf_counter() - begin) / steps)


def bench_ceiling(steps: int) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # BLAS_THREAD_VARIABLES are set: one thread each

    def seconds(world: int) -> float:
        results = context.Queue()
        procs = [context.Process(target=_independent_steps, args=(r, world, steps, results)) for r in range(world)]
        for proc in procs:
            proc.start()
        times = [results.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join(60)
        return max(times)

    one, two = seconds(1), seconds(2)
    print(f"(f) the machine's ceiling: one process, batch 128: {one * 1e3:.2f} ms/step; two independent processes, "
          f"batch 64 each: {two * 1e3:.2f} ms/step; no M=2 can exceed {one / two:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-mb", type=float, default=200.0, help="parameter bytes of the wide MLP (a, b)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stall-workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="saves of each kind in (a)")
    parser.add_argument("--repeats", type=int, default=3, help="saves per M in (b)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per M in (c)")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to measure")
    parser.add_argument("--only", choices=["a", "b", "c", "d", "e", "f"], nargs="+",
                        default=["a", "b", "c", "d", "e", "f"])
    parser.add_argument("--ddp-workers", type=int, default=2, help="M of the side by side (d); must be in --workers")
    args = parser.parse_args()
    for name in BLAS_THREAD_VARIABLES:  # one BLAS thread per worker: Ray's workers inherit these
        os.environ[name] = "1"
    root = tempfile.mkdtemp(prefix="bench_runtime_", dir=args.dir)
    ray.init(address="local", num_cpus=max(8, max(args.workers)), include_dashboard=False, log_to_driver=False)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; scratch dir {root}")
    try:
        if "a" in args.only:
            bench_stall(root, args.model_mb, args.stall_workers, args.rounds)
        if "b" in args.only:
            bench_throughput(root, args.model_mb, args.workers, args.repeats)
        if "c" in args.only or "d" in args.only:
            splits = bench_steps(root, args.workers, args.steps)
        if "d" in args.only:
            bench_ddp(root, args.ddp_workers, args.steps, next(s for s in splits if s.workers == args.ddp_workers))
        if "e" in args.only:
            bench_transport(args.steps)
        if "f" in args.only:
            bench_ceiling(args.steps)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

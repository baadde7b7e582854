"""Training-step throughput and peak memory of the engine vs PyTorch, on three workloads.

Workloads (float32, the same model, loss, optimizer and batch gather on both sides):

- ``mlp``: the seed tutorial's MLP 784-625-625-10, ReLU, dropout keep 0.8 (input) / 0.5
  (hidden), softmax cross-entropy, RMSProp(lr 1e-3, decay 0.9, eps 1e-10), batch 128 from
  a synthetic set.
- ``cnn``: ``configs/digits_cnn.yaml``'s network on digits as 8x8x1 images: conv 3x3 (16,
  same, relu) -> max pool -> conv 3x3 (32, same, relu) -> max pool -> dense 64 relu ->
  dropout 0.3 -> dense 10; Adam(lr 3e-3), batch 64. PyTorch runs it in its native NCHW layout.
- ``transformer``: ``configs/char_transformer.yaml``'s decoder on the pydoc characters
  (vocab 103, context 64, d_model 64, 4 heads, 2 pre-norm blocks, ff 256 gelu-tanh, dropout 0.1
  on embeddings, attention probabilities and both residual branches); per-token softmax
  cross-entropy; Adam(lr 3e-3), batch 32. PyTorch uses its fused
  ``scaled_dot_product_attention`` (causal, with dropout).

Speed: both sides run the same number of steps after the same warm-up, with the same
thread count (numpy's BLAS threads via threadpoolctl, ``torch.set_num_threads``). Timed
blocks alternate (engine, torch, engine, ...) so that load from other processes hits both
sides alike, and each starts on a settled machine (a pause, then two untimed steps: see
``compare``); each side's median block throughput is reported, and the ratio engine / torch.

Memory: each (workload, side) also runs alone in a fresh child process that resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``) after imports and data loading, then
builds the model and trains; reported is the peak RSS growth from that point (model,
optimizer state, activations, gradients, allocator caches), in MiB.

``--busy N`` starts N pure-Python spinning processes (one per core: the machine busy)
for the whole run, to see how each side copes with oversubscribed cores.

    python scripts/bench_engine.py                           # all workloads, numpy vs PyTorch CPU
    python scripts/bench_engine.py --workloads mlp --busy 2  # the MLP with another process on every core
    python scripts/bench_engine.py --device gpu              # cupy vs PyTorch CUDA (needs a GPU, cupy, CUDA torch)

torch is a benchmark-only dependency (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from orchestrator.engine.backend import BackendUnavailableError, get_backend
from orchestrator.engine.data import Sampler, load_chars, load_digits, make_synthetic
from orchestrator.engine.models import ModelSpec, build_model
from orchestrator.engine.network import SequentialSpec
from orchestrator.engine.optimizers import make_optimizer
from orchestrator.engine.step import Trainer
from orchestrator.engine.transformer import TransformerSpec

WORKLOADS = ("mlp", "cnn", "transformer")
TARGETS = {"mlp": 1.5, "cnn": 1.0, "transformer": 1.0}

MLP = ModelSpec(kind="mlp", input_dim=784, hidden=(625, 625), num_classes=10, activation="relu",
                keep_prob_input=0.8, keep_prob_hidden=0.5)
RMSPROP = dict(learning_rate=1e-3, decay=0.9, epsilon=1e-10)
CNN = SequentialSpec(input_shape=(8, 8, 1), num_classes=10, layers=[
    {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"},
    {"type": "max_pooling2d"},
    {"type": "conv2d", "filters": 32, "kernel_size": 3, "padding": "same", "activation": "relu"},
    {"type": "max_pooling2d"},
    {"type": "flatten"},
    {"type": "dense", "units": 64, "activation": "relu"},
    {"type": "dropout", "rate": 0.3},
    {"type": "dense"}])
CONTEXT, D_MODEL, HEADS, BLOCKS, DROPOUT = 64, 64, 4, 2, 0.1
ADAM = dict(learning_rate=3e-3, beta1=0.9, beta2=0.999, epsilon=1e-8)
BATCH = {"mlp": 128, "cnn": 64, "transformer": 32}
SETTLE_S = 0.3        # idle before each timed block: longer than OpenBLAS's ~0.1 s of spinning
SETTLE_STEPS = 2      # untimed steps that wake the block's own threads


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--batch", type=int, default=None, help="override every workload's batch size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per side, alternating")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--settle", type=float, default=SETTLE_S,
                        help="seconds of idle before each timed block (the other side's threads stop spinning)")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS / torch threads (default: numpy's current BLAS thread count)")
    parser.add_argument("--examples", type=int, default=10000, help="synthetic dataset size (mlp)")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes to start (the machine busy)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--memory-child", nargs=2, metavar=("WORKLOAD", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    return args


# ---------------------------------------------------------------------------- data
def workload_data(workload: str, args):
    if workload == "mlp":
        return make_synthetic(num_examples=args.examples, input_dim=784, num_classes=10, num_test=1, seed=0)
    if workload == "cnn":
        return load_digits()
    return load_chars(context=CONTEXT)


def batch_size(workload: str, args) -> int:
    return args.batch or BATCH[workload]


# ---------------------------------------------------------------------------- engine side
def engine_spec(workload: str, dataset):
    if workload == "mlp":
        return MLP
    if workload == "cnn":
        return CNN
    return TransformerSpec(vocab=dataset.num_classes, context=CONTEXT, d_model=D_MODEL, heads=HEADS,
                           layers=BLOCKS, dropout=DROPOUT)


def engine_step(workload: str, backend, dataset, args):
    """Trainer.train_step (batch gather, forward, backward, update) and a sync function."""
    if workload == "mlp":
        optimizer = make_optimizer("rmsprop", **RMSPROP)
    else:
        optimizer = make_optimizer("adam", **ADAM)
    trainer = Trainer(build_model(engine_spec(workload, dataset), backend, seed=0), optimizer,
                      Sampler(len(dataset.train_y), batch_size(workload, args), seed=0), dataset, seed=0)
    return trainer.train_step, backend.synchronize


# ---------------------------------------------------------------------------- torch side
def torch_model(torch, workload: str, dataset):
    nn = torch.nn
    if workload == "mlp":
        return nn.Sequential(
            nn.Dropout(1 - MLP.keep_prob_input), nn.Linear(784, 625), nn.ReLU(),
            nn.Dropout(1 - MLP.keep_prob_hidden), nn.Linear(625, 625), nn.ReLU(),
            nn.Dropout(1 - MLP.keep_prob_hidden), nn.Linear(625, 10))
    if workload == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))
    return _torch_transformer(torch, dataset.num_classes)


def _torch_transformer(torch, vocab: int):
    nn, functional = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(D_MODEL, eps=1e-5), nn.LayerNorm(D_MODEL, eps=1e-5)
            self.query, self.key, self.value = (nn.Linear(D_MODEL, D_MODEL) for _ in range(3))
            self.output = nn.Linear(D_MODEL, D_MODEL)
            self.ff1, self.ff2 = nn.Linear(D_MODEL, 4 * D_MODEL), nn.Linear(4 * D_MODEL, D_MODEL)
            self.drop = nn.Dropout(DROPOUT)

        def forward(self, x):
            batch, positions, _ = x.shape
            h = self.norm1(x)
            q, k, v = (proj(h).view(batch, positions, HEADS, -1).transpose(1, 2)
                       for proj in (self.query, self.key, self.value))
            context = functional.scaled_dot_product_attention(q, k, v, dropout_p=DROPOUT if self.training else 0.0,
                                                              is_causal=True)
            x = x + self.drop(self.output(context.transpose(1, 2).reshape(batch, positions, D_MODEL)))
            h = functional.gelu(self.ff1(self.norm2(x)), approximate="tanh")
            return x + self.drop(self.ff2(h))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab, D_MODEL)
            self.position = nn.Parameter(torch.zeros(CONTEXT, D_MODEL).uniform_(-0.05, 0.05))
            self.drop = nn.Dropout(DROPOUT)
            self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
            self.norm = nn.LayerNorm(D_MODEL, eps=1e-5)
            self.logits = nn.Linear(D_MODEL, vocab)

        def forward(self, ids):
            x = self.drop(self.embedding(ids) + self.position[:ids.shape[1]])
            for block in self.blocks:
                x = block(x)
            return self.logits(self.norm(x))

    return Decoder()


def torch_step(torch, workload: str, device: str, dataset, args):
    """The same model, loss, optimizer and batch gather in PyTorch."""
    torch.manual_seed(0)
    model = torch_model(torch, workload, dataset).to(device)
    if workload == "mlp":
        optimizer = torch.optim.RMSprop(model.parameters(), lr=RMSPROP["learning_rate"], alpha=RMSPROP["decay"],
                                        eps=RMSPROP["epsilon"])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=ADAM["learning_rate"],
                                     betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["epsilon"])
    loss_fn = torch.nn.CrossEntropyLoss()
    features = dataset.train_x
    if workload == "cnn":
        features = features.reshape(-1, 1, 8, 8)                  # NCHW, PyTorch's native layout
    train_x = torch.as_tensor(features, device=device)
    train_y = torch.as_tensor(dataset.train_y, device=device)
    sampler = Sampler(len(dataset.train_y), batch_size(workload, args), seed=0)

    def step():
        indices = torch.as_tensor(sampler.next_batch(), device=device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(train_x[indices])
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), train_y[indices].reshape(-1))
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return step, sync


# ---------------------------------------------------------------------------- timing
def steps_per_second(step, sync, steps: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()                                   # device -> host sync point on GPU
    return steps / (time.perf_counter() - start)


def compare(sides: dict, args) -> dict[str, float]:
    """Median steps/s per side over ``args.rounds`` alternating blocks, after warm-up.

    Each timed block starts on a settled machine: ``args.settle`` seconds idle, then
    ``SETTLE_STEPS`` untimed steps of that side. Without the pause a block inherits the
    other side's spinning threads (OpenBLAS's idle workers spin for up to ~0.1 s after a
    GEMM, libgomp's too): measured here, PyTorch's MLP step took 25 ms instead of 7 in the
    first 50 ms after a numpy GEMM, and its 30-step blocks ran at 9.7 ms a step right after
    an engine block against 6.4 ms after a pause, while the engine lost nothing after
    PyTorch's blocks. So the unsettled alternation (before 2026-12-02) flattered the engine.
    """
    for step, _ in sides.values():
        for _ in range(args.warmup):
            step()
    blocks = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (step, sync) in sides.items():
            time.sleep(args.settle)
            for _ in range(SETTLE_STEPS):
                step()
            blocks[name].append(steps_per_second(step, sync, args.steps))
    return {name: float(np.median(values)) for name, values in blocks.items()}


# ---------------------------------------------------------------------------- memory
def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def memory_child(workload: str, side: str, args) -> None:
    """Child process: peak RSS growth (MiB) of building and training one side, printed as JSON."""
    backend = get_backend(args.device)
    torch = import_torch("cuda" if args.device == "gpu" else "cpu") if side == "torch" else None
    dataset = workload_data(workload, args)
    threads = args.threads or blas_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    with threadpool_limits(limits=threads, user_api="blas"):
        if not _peak_rss_reset():
            print(json.dumps({"peak_mib": None}))
            return
        base = _status_kib("VmRSS")
        if side == "engine":
            step, sync = engine_step(workload, backend, dataset, args)
        else:
            step, sync = torch_step(torch, workload, "cuda" if args.device == "gpu" else "cpu", dataset, args)
        for _ in range(args.warmup + args.steps):
            step()
        sync()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - base) / 1024.0}))


def peak_memory(workload: str, side: str, args) -> float | None:
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", workload, side, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--examples", str(args.examples),
               "--threads", str(args.threads or blas_threads())]
    if args.batch:
        command += ["--batch", str(args.batch)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"bench_engine: the memory run of {workload}/{side} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


# ---------------------------------------------------------------------------- busy machine
def _spin() -> None:
    while True:
        pass


def start_busy(count: int) -> list:
    processes = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    return processes


# ---------------------------------------------------------------------------- main
def import_torch(device: str):
    try:
        import torch
    except ImportError:
        sys.exit("bench_engine: PyTorch is not installed (pip install 'orchestrator[bench]', CPU build is enough)")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_engine: --device gpu needs a CUDA build of PyTorch and a visible GPU "
                 f"(torch {torch.__version__}: torch.cuda.is_available() is False)")
    return torch


def blas_threads() -> int:
    return max((info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"), default=1)


def describe(workload: str, args) -> str:
    return {"mlp": "784-625-625-10 relu, dropout 0.8/0.5, RMSProp",
            "cnn": "digits CNN 8x8x1: conv16-pool-conv32-pool-dense64-dropout-10, Adam",
            "transformer": f"char decoder: context {CONTEXT}, d_model {D_MODEL}, {HEADS} heads, {BLOCKS} blocks, "
                           f"dropout {DROPOUT}, Adam"}[workload] + f", batch {batch_size(workload, args)}"


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        backend = get_backend(args.device)
    except BackendUnavailableError as exc:
        sys.exit(f"bench_engine: --device gpu: {exc}")
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    torch = import_torch(torch_device)
    threads = args.threads or blas_threads()
    torch.set_num_threads(threads)
    busy = start_busy(args.busy)
    try:
        print(f"threads: {threads} (numpy BLAS via threadpoolctl = torch.set_num_threads); torch {torch.__version__}; "
              f"numpy {np.__version__}; {os.cpu_count()} cores, {args.busy} spinning processes; "
              f"{args.warmup} warm-up steps, then {args.rounds} alternating blocks of {args.steps} steps per side, "
              f"each after {args.settle:g} s idle and {SETTLE_STEPS} untimed steps")
        for workload in args.workloads:
            dataset = workload_data(workload, args)
            with threadpool_limits(limits=threads, user_api="blas"):
                sides = {"engine": engine_step(workload, backend, dataset, args),
                         "torch": torch_step(torch, workload, torch_device, dataset, args)}
                result = compare(sides, args)
            engine, reference = result["engine"], result["torch"]
            print(f"[{workload}] {describe(workload, args)}")
            print(f"  engine ({backend.name}): {engine:8.1f} steps/s (median block)")
            print(f"  torch  ({torch_device}):   {reference:8.1f} steps/s (median block)")
            print(f"  ratio engine / torch: {engine / reference:.2f}x (target >= {TARGETS[workload]:.1f}x)")
            if not args.no_memory:
                mine, theirs = peak_memory(workload, "engine", args), peak_memory(workload, "torch", args)
                if mine is None:
                    print("  peak memory: not measurable here (no /proc/self/clear_refs)")
                else:
                    print(f"  peak memory growth: engine {mine:.1f} MiB, torch {theirs:.1f} MiB")
    finally:
        for process in busy:
            process.terminate()


if __name__ == "__main__":
    main()

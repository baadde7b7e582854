"""Training-step throughput of the engine vs PyTorch on the same model and work.

Model: the seed tutorial's MLP 784-625-625-10, ReLU, dropout keep 0.8 (input) / 0.5 (hidden),
softmax cross-entropy, RMSProp(lr 1e-3, decay 0.9, momentum 0, eps 1e-10), float32, global
batch 128 gathered from a synthetic dataset each step. Both sides run the same number of steps
after the same warm-up, with the same thread count (numpy's BLAS threads via threadpoolctl,
torch.set_num_threads). One run of the script alternates timed blocks (engine, torch, engine,
...) so that load from other processes hits both sides alike; it prints each side's median
block throughput in steps/s and the ratio engine / torch.

    python scripts/bench_engine.py                  # numpy vs PyTorch CPU
    python scripts/bench_engine.py --device gpu     # cupy vs PyTorch CUDA (needs a GPU, cupy, CUDA torch)

torch is a benchmark-only dependency (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from orchestrator.engine.backend import BackendUnavailableError, get_backend
from orchestrator.engine.data import Sampler, make_synthetic
from orchestrator.engine.models import ModelSpec, build_model
from orchestrator.engine.optimizers import make_optimizer
from orchestrator.engine.step import Trainer

SPEC = ModelSpec(kind="mlp", input_dim=784, hidden=(625, 625), num_classes=10, activation="relu",
                 keep_prob_input=0.8, keep_prob_hidden=0.5)
LEARNING_RATE, DECAY, EPSILON = 1e-3, 0.9, 1e-10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per side, alternating")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS / torch threads (default: numpy's current BLAS thread count)")
    parser.add_argument("--examples", type=int, default=10000, help="synthetic dataset size")
    return parser.parse_args(argv)


def engine_step(backend, dataset, args):
    """Trainer.train_step (batch gather, forward, backward, update) and a sync function."""
    trainer = Trainer(build_model(SPEC, backend, seed=0),
                      make_optimizer("rmsprop", LEARNING_RATE, decay=DECAY, epsilon=EPSILON),
                      Sampler(len(dataset.train_y), args.batch, seed=0), dataset, seed=0)
    return trainer.train_step, backend.synchronize


def steps_per_second(step, sync, steps: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()                                   # device -> host sync point on GPU
    return steps / (time.perf_counter() - start)


def torch_step(torch, device: str, dataset, args):
    """The same model, loss, optimizer and batch gather in PyTorch."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Dropout(1 - SPEC.keep_prob_input), nn.Linear(784, 625), nn.ReLU(),
        nn.Dropout(1 - SPEC.keep_prob_hidden), nn.Linear(625, 625), nn.ReLU(),
        nn.Dropout(1 - SPEC.keep_prob_hidden), nn.Linear(625, 10)).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=LEARNING_RATE, alpha=DECAY, eps=EPSILON)
    loss_fn = nn.CrossEntropyLoss()
    train_x = torch.as_tensor(dataset.train_x, device=device)
    train_y = torch.as_tensor(dataset.train_y, device=device)
    sampler = Sampler(len(dataset.train_y), args.batch, seed=0)

    def step():
        indices = torch.as_tensor(sampler.next_batch(), device=device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(train_x[indices]), train_y[indices])
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return step, sync


def compare(sides: dict, args) -> dict[str, float]:
    """Median steps/s per side over ``args.rounds`` alternating blocks, after warm-up."""
    for step, _ in sides.values():
        for _ in range(args.warmup):
            step()
    blocks = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (step, sync) in sides.items():
            blocks[name].append(steps_per_second(step, sync, args.steps))
    return {name: float(np.median(values)) for name, values in blocks.items()}


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


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        backend = get_backend(args.device)
    except BackendUnavailableError as exc:
        sys.exit(f"bench_engine: --device gpu: {exc}")
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    torch = import_torch(torch_device)
    threads = args.threads or blas_threads()
    torch.set_num_threads(threads)
    dataset = make_synthetic(num_examples=args.examples, input_dim=784, num_classes=10, num_test=1, seed=0)
    with threadpool_limits(limits=threads, user_api="blas"):
        sides = {"engine": engine_step(backend, dataset, args),
                 "torch": torch_step(torch, torch_device, dataset, args)}
        result = compare(sides, args)
    engine, reference = result["engine"], result["torch"]
    print(f"model 784-625-625-10 relu, dropout 0.8/0.5, RMSProp, float32, batch {args.batch}; "
          f"{args.warmup} warm-up steps, then {args.rounds} alternating blocks of {args.steps} steps per side")
    print(f"threads: {threads} (numpy BLAS via threadpoolctl = torch.set_num_threads); "
          f"torch {torch.__version__}; numpy {np.__version__}")
    print(f"engine ({backend.name}): {engine:8.1f} steps/s (median block)")
    print(f"torch  ({torch_device}):   {reference:8.1f} steps/s (median block)")
    print(f"ratio engine / torch: {engine / reference:.2f}x")


if __name__ == "__main__":
    main()

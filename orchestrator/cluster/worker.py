"""The worker actor: one of M processes training one model together.

Each worker holds the whole model (to compute gradients on its slice of the global
batch) but *owns* only a balanced share of the variables (``ownership``): it keeps
the optimizer slots of those, applies their updates, and writes them into its
checkpoint shard ``<prefix>.data-<rank>-of-<M>``. Worker 0 also writes the job's
small records (``global_step``, ``_ITERATOR_STATE``, ``_RNG_STATE``,
``_MODEL_STRUCTURE``).

Training runs in the workers: the coordinator asks every rank for a chunk of steps
(``train_steps(step, count)``) and each rank runs the engine's step (``engine.step.TrainStep``)
that many times, exchanging gradients and parameters directly with its peers
(``exchange``: a TCP mesh on CPUs, NCCL on GPUs). Before the first chunk the
coordinator connects them: ``exchange_address()`` on every rank, then
``exchange_connect(addresses)``, which also brings every rank the owners' current
parameters (after a restore each rank read only what it owns).

Saves: ``start_save`` (training thread: snapshot, then write in the background when
async) and ``wait_save`` (the ``io`` concurrency group, so it can block while training
calls keep running). Nothing here ever commits a checkpoint: the coordinator does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import numpy as np
import ray

from orchestrator.checkpoint import structure as structure_lib
from orchestrator.checkpoint import warm_start as warm_start_lib
from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.cluster import recipe
from orchestrator.cluster.errors import ClusterError, RestoreError
from orchestrator.cluster.exchange import NcclExchange, SocketExchange
from orchestrator.cluster.ownership import assign_owners
from orchestrator.cluster.peer_memory import MemoryShard, MemoryTier, PeerMemoryWorker
from orchestrator.cluster.shard_save import ShardSaver
from orchestrator.engine import protocol
from orchestrator.engine.data import DatasetError
from orchestrator.engine.backend import get_backend
from orchestrator.engine.models import build_model
from orchestrator.engine.step import LocalExchange, TrainStep

GLOBAL_STEP_KEY = "global_step"
ITERATOR_STATE_KEY = "_ITERATOR_STATE"
RNG_STATE_KEY = "_RNG_STATE"
RNG_ALGORITHM = "philox4x32-10(seed, step, layer, example, unit)"
IO_GROUP = "io"
PEER_GROUP = "peer"        # memory-tier copies between workers (never behind a shard write)
CONTROL_GROUP = "control"  # liveness: answers while the training thread is busy


def json_tensor(record: Mapping[str, Any]) -> np.ndarray:
    """A JSON record as a 0-d DT_STRING tensor."""
    return np.array(json.dumps(record, sort_keys=True).encode("utf-8"), dtype=object)


def decode_json_tensor(value: Any) -> dict:
    raw = np.asarray(value, dtype=object).reshape(()).item()
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


@dataclasses.dataclass
class StepTimings:
    """Where one rank's training time went, summed over steps (``scripts/bench_runtime.py`` reads it).

    compute: the engine's work (batch gather, forward, backward, the in-order gradient sum,
    the optimizer update). exchange: moving gradients and parameters between the ranks,
    waiting for the slowest peer included. Time outside ``train_steps`` (driver round
    trips, Ray task submission) is neither; the benchmark reports it as orchestration.
    """

    steps: int = 0
    compute_s: float = 0.0
    exchange_s: float = 0.0


class TrainWorker(PeerMemoryWorker):
    """Plain class holding one rank's state; ``WorkerActor`` is its Ray actor form."""

    def __init__(self, config, rank: int, num_workers: int, dataset=None):
        """``dataset``: shared by the coordinator through the object store (zero-copy on one
        node); None loads it here.

        A plug-in or data error is kept and raised by ``info()``, the coordinator's first call:
        an exception raised here would reach the driver as bare text, losing its type, and the
        coordinator needs the type to stop the job instead of restarting it.
        """
        self.config, self.rank, self.num_workers = config, rank, num_workers
        self._dataset_source = dataset
        self._setup_error: Exception | None = None
        try:
            self._setup(dataset)
        except (protocol.PluginError, DatasetError) as exc:
            self._setup_error = exc

    def become(self, rank: int) -> dict:
        """A spare (``fault_tolerance.spare_workers``, started ahead as rank 0) takes ``rank``: its
        process, imports and data are ready, only the rank's share is set up again. Its ``info()``."""
        self.rank = rank
        try:
            self._setup(self._dataset_source)
        except (protocol.PluginError, DatasetError) as exc:
            self._setup_error = exc
        return self.info()

    def _setup(self, dataset) -> None:
        config, rank, num_workers = self.config, self.rank, self.num_workers
        recipe.add_code_paths(config)
        self.seed = int(config.seed)
        self.backend = get_backend(config.device.value)
        self.dataset = recipe.rank_data(dataset if dataset is not None else recipe.load_data(config), rank,
                                        num_workers)
        self.spec = recipe.model_spec(config, self.dataset)
        self.model = build_model(self.spec, self.backend, self.seed)
        self.variables = {v.name: v for v in self.model.variables}
        self.ownership = assign_owners({n: v.nbytes for n, v in self.variables.items()}, num_workers)
        self.owned = self.ownership.owned_by(rank)
        self.optimizer = recipe.make_optimizer(config)
        self.slots = {n: list(self.optimizer.create_slots(self.variables[n])) for n in self.owned}
        self.sampler = recipe.make_sampler(config, self.dataset, self.seed)
        self.global_step = 0
        self.saver = ShardSaver(rank, config.checkpoint.storage_options, config.checkpoint.fsync)
        self.step = self._train_step()
        self.exchange: Any = LocalExchange()
        self.memory = MemoryTier()  # this rank's memory checkpoints and a peer's copies (peer_memory)
        self.timings = StepTimings()

    def _train_step(self) -> TrainStep:
        return TrainStep(self.model, self.optimizer, self.sampler, self.backend.asarray(self.dataset.train_x),
                         self.backend.asarray(self.dataset.train_y), seed=self.seed,  # host -> device once
                         global_batch_size=self.config.data.global_batch_size, owned=self.owned, slots=self.slots,
                         rank=self.rank, world=self.num_workers, xp=self.backend.xp,
                         before_update=self.saver.wait_snapshot)  # an async save must have copied the values first

    # ------------------------------------------------------------------ identity
    def info(self) -> dict:
        if self._setup_error is not None:
            raise self._setup_error
        return {"rank": self.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "owned": list(self.owned), "global_step": self.global_step}

    # ------------------------------------------------------------------ exchange
    def exchange_address(self) -> Any:
        """Open this rank's end of a fresh exchange; what the peers need to reach it."""
        self.exchange.close()
        if self.num_workers == 1:
            self.exchange = LocalExchange()
            return None
        if self.backend.is_gpu:
            self.exchange = NcclExchange(self.rank, self.num_workers, self.variables, self.ownership)
        else:
            self.exchange = SocketExchange(self.rank, self.num_workers, self.variables, self.ownership,
                                           timeout=float(self.config.fault_tolerance.step_timeout_s),
                                           host=ray.util.get_node_ip_address(),
                                           node=ray.get_runtime_context().get_node_id())
        return self.exchange.address()

    def exchange_connect(self, addresses: list) -> None:
        """Join the exchange (every rank's ``exchange_address``); every rank then holds every owner's parameters."""
        if self.num_workers > 1:
            self.exchange.connect(addresses)

    # ------------------------------------------------------------------ training
    def train_steps(self, step: int, count: int) -> list[dict]:
        """Run global steps ``step .. step+count-1``; this rank's metrics of each.

        Stops early, on every rank at the same step, when the global loss is not finite.
        On any error the exchange is closed, so the peers fail at once instead of waiting
        out the step timeout.
        """
        began, exchanged = time.perf_counter(), self.exchange.seconds
        results = []
        try:
            self._check_step(step)  # inside: a rank at the wrong step must not leave its peers waiting
            for current in range(step, step + count):
                metrics = self.step(current, self.exchange)
                self.global_step = current + 1
                results.append(metrics.as_dict())
                if not np.isfinite(metrics.global_loss_sum):
                    break
        except BaseException:
            self.exchange.close()
            raise
        finally:
            exchange_s = self.exchange.seconds - exchanged
            self.timings.steps += len(results)
            self.timings.exchange_s += exchange_s
            self.timings.compute_s += time.perf_counter() - began - exchange_s
        return results

    def evaluate(self) -> dict[str, float]:
        """Metrics on the evaluation split; every rank holds every parameter after each step."""
        if not len(self.dataset.test_y):
            return {}  # no evaluation split
        params = {n: v.value for n, v in self.variables.items()}
        out = protocol.parse_eval_output(self.model.evaluate(
            params, self.backend.asarray(self.dataset.test_x), self.backend.asarray(self.dataset.test_y)))
        metrics = {"eval_loss": out.loss, **{f"eval_{k}": v for k, v in out.metrics.items()}}
        if out.accuracy is not None:
            metrics["eval_accuracy"] = out.accuracy
        return metrics

    def _check_step(self, step: int) -> None:
        if step != self.global_step:
            raise ClusterError(f"rank {self.rank}: asked for step {step} but is at step {self.global_step}")

    def step_timings(self) -> StepTimings:
        return dataclasses.replace(self.timings)

    # ------------------------------------------------------------------ state
    def owned_arrays(self) -> dict[str, Any]:
        """Every array this rank checkpoints: owned variables and their slots."""
        arrays = {n: self.variables[n].value for n in self.owned}
        for slots in self.slots.values():
            arrays.update({slot.name: slot.value for slot in slots})
        return arrays

    def host_state(self) -> dict[str, np.ndarray]:
        """Host copies of ``owned_arrays`` (tests compare these bit for bit)."""
        return {n: np.array(self.backend.to_host(a)) for n, a in self.owned_arrays().items()}

    def job_records(self) -> dict[str, np.ndarray]:
        """The small records worker 0 writes next to the variables."""
        records = {
            GLOBAL_STEP_KEY: np.array(self.global_step, dtype=np.int64),
            ITERATOR_STATE_KEY: json_tensor(self.sampler.state()),
            RNG_STATE_KEY: json_tensor({"algorithm": RNG_ALGORITHM, "seed": self.seed}),
        }
        records.update(structure_lib.structure_tensors(self.spec.to_dict(), list(self.variables)))
        return records

    # ------------------------------------------------------------------ saving
    def start_save(self, step: int, prefix: str, asynchronous: bool) -> None:
        """Start writing this rank's shard of the checkpoint of ``step`` (async: in the background)."""
        self._check_step(step)
        extras = self.job_records() if self.rank == 0 else {}
        self.saver.start(step, prefix, self.num_workers, self.owned_arrays(), extras, asynchronous,
                         on_snapshot=self.save_snapshot_hook(step))

    def wait_save(self, step: int, timeout: float | None = None) -> tuple[Any, float]:
        """(this rank's ShardResult, seconds training waited for the snapshot); raises if the write failed."""
        return self.saver.wait(step, timeout), self.saver.blocked_seconds(step)

    def abandon_save(self, step: int) -> None:
        self.saver.abandon(step)

    def last_write_seconds(self) -> float:
        return self.saver.last_write_seconds()

    # ------------------------------------------------------------------ restoring
    def restore(self, prefix: str) -> dict:
        """Read what this rank owns now (any M wrote it) plus the job records; range reads only."""
        self.saver.finish_previous()
        reader = CheckpointReader(prefix, recipe.checkpoint_options(self.config))
        self._check_structure(reader, prefix)
        owned = self.owned_arrays()
        records = {GLOBAL_STEP_KEY: None, RNG_STATE_KEY: None, ITERATOR_STATE_KEY: None}
        values = _read_tensors(reader, prefix, {**owned, **records})  # one batched read of everything
        for name in owned:
            self._assign(name, values[name])
        self.set_position({"global_step": int(values[GLOBAL_STEP_KEY]),
                           "seed": int(decode_json_tensor(values[RNG_STATE_KEY])["seed"]),
                           "iterator": decode_json_tensor(values[ITERATOR_STATE_KEY])})
        return {"rank": self.rank, "global_step": self.global_step, "read": sorted(owned)}

    def warm_start(self, prefix: str) -> dict:
        """``init_from``: assign the owned variables the plan takes from ``prefix``; the rest keep their
        initial values, the step stays 0. Returns the plan (every rank computes the same one)."""
        plan = recipe.warm_start_plan(self.config, self.variables.values(), prefix)
        owned = {name: plan.taken[name] for name in self.owned if name in plan.taken}
        options = dict(self.config.init_from.storage_options)
        with warm_start_lib.open_source(prefix, options) as reader:
            values = reader.get_tensors(owned.values())
        for name, source in owned.items():
            self.variables[name].assign(values[source])
        return dataclasses.asdict(plan)

    def position(self) -> dict:
        """Where this rank is besides its arrays: step, data iterator, seed (JSON values)."""
        return {"global_step": self.global_step, "iterator": self.sampler.state(), "seed": self.seed}

    def set_position(self, position: Mapping[str, Any]) -> None:
        self.global_step = int(position["global_step"])
        self.seed = int(position["seed"])
        self.sampler = recipe.make_sampler(self.config, self.dataset, self.seed)
        self.sampler.set_state(position["iterator"])
        self.step = self._train_step()  # the restored seed and sampler

    def _assign(self, name: str, value: np.ndarray) -> None:
        target = self.variables.get(name)
        if target is None:
            target = next(s for slots in self.slots.values() for s in slots if s.name == name)
        target.assign(value)

    def _check_structure(self, reader, prefix: str) -> None:
        record = structure_lib.read_structure(reader)
        if record is None:
            raise RestoreError(f"{prefix}: no {structure_lib.STRUCTURE_KEY} record; not written by this runtime, so "
                               f"it cannot be resumed: {recipe.WARM_START_HINT}")
        expected = json.loads(json.dumps(self.spec.to_dict()))
        if record["spec"] != expected:
            diffs = sorted(k for k in set(expected) | set(record["spec"])
                           if expected.get(k) != record["spec"].get(k))
            detail = ", ".join(f"{k}: checkpoint {record['spec'].get(k)!r} vs config {expected.get(k)!r}"
                               for k in diffs)
            raise RestoreError(f"{prefix}: the checkpoint holds a different model ({detail}); {recipe.WARM_START_HINT}")


def _read_tensors(reader, prefix: str, likes: dict[str, Any]) -> dict[str, np.ndarray]:
    """The named tensors, each checked against the array it will replace (None: no check)."""
    for name in likes:
        if not reader.has_tensor(name):
            raise RestoreError(f"{prefix}: tensor {name!r} is missing from the checkpoint")
    values = reader.get_tensors(likes)
    for name, like in likes.items():
        value = values[name]
        if like is not None and (tuple(value.shape) != tuple(like.shape) or value.dtype != like.dtype):
            raise RestoreError(f"{prefix}: tensor {name!r} is {value.dtype}{list(value.shape)} in the "
                               f"checkpoint but {np.dtype(like.dtype)}{list(like.shape)} in the model")
    return values


class WorkerActor(TrainWorker):
    """``TrainWorker`` with the save-status calls in their own concurrency group."""

    @ray.method(concurrency_group=IO_GROUP)
    def wait_save(self, step: int, timeout: float | None = None) -> tuple[Any, float]:
        return TrainWorker.wait_save(self, step, timeout)

    @ray.method(concurrency_group=IO_GROUP)
    def abandon_save(self, step: int) -> None:
        self.saver.abandon(step)

    @ray.method(concurrency_group=IO_GROUP)
    def last_write_seconds(self) -> float:
        return self.saver.last_write_seconds()

    @ray.method(concurrency_group=PEER_GROUP)
    def memory_shard(self, step: int, timeout: float = 60.0) -> MemoryShard:
        return PeerMemoryWorker.memory_shard(self, step, timeout)

    @ray.method(concurrency_group=PEER_GROUP)
    def hold_peer(self, shard: MemoryShard) -> int:
        return PeerMemoryWorker.hold_peer(self, shard)

    @ray.method(concurrency_group=PEER_GROUP)
    def peer_shard(self, rank: int, step: int) -> MemoryShard:
        return PeerMemoryWorker.peer_shard(self, rank, step)

    @ray.method(concurrency_group=PEER_GROUP)
    def memory_complete(self, step: int) -> None:
        PeerMemoryWorker.memory_complete(self, step)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def memory_nbytes(self) -> dict[str, int]:
        return PeerMemoryWorker.memory_nbytes(self)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def alive(self) -> int:
        """This process's pid: answered at once, even mid-step (the coordinator's liveness probe)."""
        return os.getpid()


def remote_worker_class():
    """The Ray actor class (created lazily so importing this module does not need Ray running)."""
    return ray.remote(concurrency_groups={IO_GROUP: 2, PEER_GROUP: 2, CONTROL_GROUP: 1})(WorkerActor)

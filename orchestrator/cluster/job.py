"""``run_job``: what ``orchestrator train`` calls.

First, before Ray starts, ``startup.claim`` checks what the job was given and takes its
checkpoint directory: a ``resume:`` path must hold a committed checkpoint, the directory
must take a probe write, and the run holds the directory's lock for its whole life (one
run per directory; ``checkpoint.claim``). Bad input stops here, with nothing written.
Then it connects to Ray (an in-process local Ray by default; ``cluster.address`` or
``RAY_ADDRESS`` joins an existing cluster), checks that the checkpoint directory is
reachable by every worker, then hands the job to the ``Supervisor`` (the restart loop
around the ``Coordinator``: failures, preemption, elastic sizing).

Why the storage check: workers on different nodes each write their own shard, and
the coordinator commits them all, so all of them must see the same directory. A local
path is only shared when there is one node (or a shared mount, which Ray cannot tell
from a local disk, so a multi-node job must use a URL: s3://, gs://, ...). ``memory://``
is private to each process and never works across Ray actors.
"""

from __future__ import annotations

import logging
import math
import os

import ray

from orchestrator.checkpoint.storage import Storage
from orchestrator.cluster import recipe, startup
from orchestrator.cluster.coordinator import JobResult
from orchestrator.cluster.errors import ClusterSetupError
from orchestrator.cluster.supervisor import Supervisor

__all__ = ["JobResult", "run_job", "connect", "check_shared_storage"]

log = logging.getLogger(__name__)


def run_job(config, reporter=None, dataset=None) -> JobResult:
    """Train ``config`` on Ray and return what happened (see ``JobResult``).

    ``dataset``: the job's data when the caller already loaded it (``preflight``); it is put
    in Ray's object store once and shared by every attempt's workers.
    """
    with startup.claim(config):
        if startup.received():  # SIGINT/SIGTERM before Ray: stop as a preemption would, Ray never started
            return startup.stopped_before_start(config)
        try:
            started_ray = connect(config)
        except SystemExit:  # ray.init's own SIGTERM handler exits mid-start: stop as a preemption would
            startup.record("SIGTERM received by the driver while Ray was starting")
            ray.shutdown()
            return startup.stopped_before_start(config)
        startup.take_back()  # ray.init installed its SIGTERM handler (exit at once); ours again until the watcher
        try:
            check_shared_storage(config)
            shared = None if dataset is None else ray.put(dataset)
            supervisor = Supervisor(config, reporter, dataset=shared)
            startup.hand_over(supervisor.watcher.request)
            return supervisor.run()
        finally:
            if started_ray:
                ray.shutdown()


def local_num_cpus(config) -> int:
    """Logical CPUs an in-process Ray declares: enough for every worker, at least 8."""
    if config.cluster.num_cpus:
        return int(config.cluster.num_cpus)
    return max(8, math.ceil(config.workers.max * config.resources.cpus_per_worker))


def connect(config) -> bool:
    """Initialise Ray unless it already is; True when this call started it."""
    if ray.is_initialized():
        return False
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        # address="local": always a fresh in-process instance, never a Ray another process started
        ray.init(address="local", num_cpus=local_num_cpus(config), include_dashboard=False, log_to_driver=False)
    return True


def check_shared_storage(config) -> None:
    """Reject checkpoint directories the workers cannot all reach (before anything starts)."""
    directory = config.checkpoint.dir
    storage, _ = Storage.for_path(directory, recipe.checkpoint_options(config))
    if storage.protocol == "memory":
        raise ClusterSetupError(
            f"checkpoint.dir {directory!r}: memory:// is private to each process, so Ray workers "
            f"cannot share it; use a local path, s3://, gs:// or a shared mount")
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if storage.is_local and len(alive) > 1:
        raise ClusterSetupError(
            f"checkpoint.dir {directory!r} is a local path but the Ray cluster has {len(alive)} alive "
            f"nodes: every worker writes its own shard there, so the directory must be shared storage. "
            f"Set checkpoint.dir to an s3://, gs:// (or other fsspec) URL")

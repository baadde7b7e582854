"""Helpers for runtime tests: small job configs, worker state collection, single-process reference."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from orchestrator.config import JobConfig

RAY_TIMEOUT_S = 120


def make_config(directory: str, *, workers: int = 2, steps: int = 20, save_every: int = 0,
                hidden=(32,), optimizer: str = "adam", learning_rate: float = 3e-3, batch: int = 64,
                async_save: bool = True, resume: str = "auto", eval_every: int = 0,
                keep=(0.9, 0.7), max_to_keep: int | None = 10, seed: int = 0,
                step_timeout_s: float = 60.0) -> JobConfig:
    """A digits MLP job small enough for a 2-core CI machine.

    ``save_every=0``: no periodic checkpoint within a test (the hourly one never comes), only
    the final one; a job config must say how often to checkpoint.
    """
    return JobConfig(
        name="test", seed=seed,
        model={"hidden": list(hidden), "keep_prob_input": keep[0], "keep_prob_hidden": keep[1]},
        data={"global_batch_size": batch},
        optimizer={"name": optimizer, "learning_rate": learning_rate},
        train={"steps": steps, "log_every_steps": 10, "eval_every_steps": eval_every},
        workers=workers,
        resources={"cpus_per_worker": 0.25},
        checkpoint={"dir": directory, "save_every_steps": save_every, "async_save": async_save,
                    "max_to_keep": max_to_keep, "fsync": False, "save_every_secs": None if save_every else 3600.0},
        fault_tolerance={"step_timeout_s": step_timeout_s},
        resume=resume,
    )


def with_changes(config: JobConfig, **groups) -> JobConfig:
    """``with_changes(cfg, train={"steps": 5}, resume="never")``: validated, like every config."""
    return config.replace(**groups)


def worker_state(coordinator, timeout: float = RAY_TIMEOUT_S) -> dict[str, np.ndarray]:
    """Every variable and slot of the job, gathered from the owners (host copies)."""
    import ray

    merged: dict[str, np.ndarray] = {}
    for part in ray.get([w.host_state.remote() for w in coordinator.workers], timeout=timeout):
        assert not set(part) & set(merged), "a tensor has two owners"
        merged.update(part)
    return merged


def assert_bit_identical(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert actual[name].shape == expected[name].shape, name
        assert actual[name].tobytes() == expected[name].tobytes(), f"{name} differs"


@pytest.fixture
def run_coordinator(ray_session):
    """Start coordinators and shut every one of them down after the test."""
    from orchestrator.cluster.coordinator import Coordinator

    started = []

    def start(config, **kwargs):
        coordinator = Coordinator(config, **kwargs)
        started.append(coordinator)
        coordinator.start()
        return coordinator

    yield start
    for coordinator in started:
        coordinator.shutdown()


def stop_then_resume_with_a_sigkill(config, stop_at: int, kill_at: int):
    """Run ``config`` until ``stop_at`` (a clean stop), then resume it with the last worker SIGKILLed at ``kill_at``.

    The stop uses one-step chunks so the driver sees every step and stops exactly at ``stop_at``; the
    resumed run is a Supervisor (which replaces the killed worker). Returns (recorder, resumed result):
    the recorder holds every step reported by the resumed run.
    """
    from orchestrator.cluster.coordinator import Coordinator
    from orchestrator.cluster.supervisor import Supervisor

    from .test_supervisor import Recorder, worker_pids

    stopped = Coordinator(config, max_chunk_steps=1)
    try:
        stopped.start()
        assert stopped.run(stop_requested=lambda: stopped.global_step >= stop_at).preempted
    finally:
        stopped.shutdown()

    recorder = Recorder()
    supervisor = Supervisor(config, recorder)
    recorder.actions = {kill_at: lambda: os.kill(worker_pids(supervisor)[-1], signal.SIGKILL)}
    return recorder, supervisor.run()


@pytest.fixture(scope="session")
def two_nodes(tmp_path_factory, s3_server):
    """The two-node scenarios of tests/cluster/two_nodes.py, run once per session on one cluster."""
    from tests.cluster import two_nodes as child
    from tests.conftest import new_bucket, s3_options_for

    options = s3_options_for(s3_server)
    return child.outcome(tmp_path_factory.mktemp("two-nodes"), new_bucket(options), options, timeout=500)


def two_node_scenario(outcome: dict, name: str) -> dict:
    """One scenario's result; fails the test with its traceback (or the child's output) if it did not end well."""
    record = outcome.get(name)
    assert record is not None, f"scenario {name!r} printed no result: {outcome['_output']}"
    assert record["ok"], record["error"]
    return record

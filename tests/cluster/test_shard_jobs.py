"""A job on a directory of shard files (issue 12, sharded data mode), M=2 on real local Ray.

Each worker reads only its own shards (measured in the live workers: exactly its share of
the rows, never the whole set; the bound on the peak while reading: tests/engine/test_shards.py).
Stopped at step 6 and resumed, with a worker SIGKILLed at step 11 (the replacement reads its
shards again), the run ends bit-identical to one never interrupted.
"""

from __future__ import annotations

import os
import signal

import ray

from orchestrator.cluster.coordinator import Coordinator
from orchestrator.cluster.supervisor import Supervisor
from orchestrator.config import load_config
from tests.plugin_fixtures import encode, make_arrays, write_job, write_plugin

from .test_supervisor import Recorder, read_all, restarts, worker_pids

STEPS, SAVE_EVERY, STOP_AT, KILL_AT = 16, 4, 6, 11
SHARD_ROWS = (60, 70, 50, 40, 80)  # rank 0 of 2 reads shards 0, 2, 4 (190 rows), rank 1 shards 1, 3 (110)


def _held(coordinator: Coordinator) -> list[tuple[int, int]]:
    """(rows, bytes) of the training arrays each live worker holds."""
    def measure(worker):
        return len(worker.dataset.train_y), worker.dataset.train_x.nbytes + worker.dataset.train_y.nbytes

    return ray.get([w.__ray_call__.remote(measure) for w in coordinator.workers], timeout=60)


def test_sharded_directory_job_reads_own_shards_and_resumes_bit_identical(tmp_path, monkeypatch, ray_session):
    job = tmp_path / "job"
    module = write_plugin(job)
    x, y = make_arrays(sum(SHARD_ROWS) + 200)
    shards, start = tmp_path / "shards", 0
    shards.mkdir()
    for i, rows in enumerate(SHARD_ROWS):
        (shards / f"part-{i:02d}.npz").write_bytes(encode("npz", x[start:start + rows], y[start:start + rows]))
        start += rows
    (tmp_path / "eval.npz").write_bytes(encode("npz", x[start:], y[start:]))
    monkeypatch.chdir(job)

    def config(checkpoints: str):
        data = f"  format: npz\n  path: {shards}\n  eval_path: {tmp_path / 'eval.npz'}"
        return load_config(write_job(job, module, data, workers=2, steps=STEPS, save_every=SAVE_EVERY,
                                     checkpoint_dir=checkpoints))

    reference = Supervisor(config("reference"), Recorder()).run()
    assert reference.steps_completed == STEPS and reference.final_metrics["eval_accuracy"] > 0.5
    expected = read_all(reference.last_checkpoint)

    interrupted = config("interrupted")
    stopped = Coordinator(interrupted, max_chunk_steps=1)  # the driver sees every step: stop exactly at STOP_AT
    try:
        stopped.start()
        row_bytes = x.itemsize * x.shape[1] + 8
        assert _held(stopped) == [(190, 190 * row_bytes), (110, 110 * row_bytes)]  # each its own shards only
        assert stopped.run(stop_requested=lambda: stopped.global_step >= STOP_AT).preempted
    finally:
        stopped.shutdown()

    recorder = Recorder()
    supervisor = Supervisor(interrupted, recorder)
    recorder.actions = {KILL_AT: lambda: os.kill(worker_pids(supervisor)[0], signal.SIGKILL)}
    resumed = supervisor.run()
    assert recorder.steps[0] == STOP_AT + 1                 # the data position came back with the step
    (killed, again), = restarts(recorder.steps)              # back to the last committed save, shards read again
    # killed when step 11 was reported, after the chunk of steps holding it had run
    assert killed >= KILL_AT and again in (STOP_AT + 1, 9)   # step 8's save commits in the background
    assert resumed.steps_completed == STEPS and resumed.failures_recovered == 1
    assert read_all(resumed.last_checkpoint) == expected     # bit-identical

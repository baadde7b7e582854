"""Auto-resume (bit-identical to an uninterrupted run), resharding M -> M', TensorFlow reads our shards."""

from __future__ import annotations

import os

import numpy as np
import pytest

from orchestrator.checkpoint import bundle
from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.cluster.errors import RestoreError
from orchestrator.cluster.worker import GLOBAL_STEP_KEY, ITERATOR_STATE_KEY, RNG_STATE_KEY

from .conftest import assert_bit_identical, make_config, with_changes, worker_state

STEPS = 16
RECIPE = dict(hidden=(24, 16), optimizer="rmsprop", learning_rate=1e-3, batch=40, keep=(0.8, 0.5))


def stop_after(coordinator, step: int):
    """A stop_requested callable that fires once the coordinator reached ``step``."""
    return lambda: coordinator.global_step >= step


def test_stop_and_resume_at_arbitrary_steps_is_bit_identical(tmp_path, run_coordinator):
    straight = run_coordinator(make_config(str(tmp_path / "a"), steps=STEPS, save_every=5, **RECIPE))
    straight.run()
    expected = worker_state(straight)

    config = make_config(str(tmp_path / "b"), steps=STEPS, save_every=5, **RECIPE)
    for stop_at in (7, 13):  # between the regular saves at 5, 10, 15
        coordinator = run_coordinator(config, max_chunk_steps=1)  # the driver sees every step: stop exactly there
        result = coordinator.run(stop_requested=stop_after(coordinator, stop_at))
        assert result.preempted and result.steps_completed == stop_at
        assert result.last_checkpoint.endswith(f"model.ckpt-{stop_at}")
        coordinator.shutdown()
    resumed = run_coordinator(config)
    assert resumed.restored_from.endswith("model.ckpt-13") and resumed.global_step == 13
    result = resumed.run()
    assert result.steps_completed == STEPS and not result.preempted
    assert_bit_identical(worker_state(resumed), expected)


def test_resume_setting_picks_the_checkpoint(four_worker_checkpoint, tmp_path):
    from orchestrator.cluster.coordinator import Coordinator

    config, prefix, _ = four_worker_checkpoint
    directory = os.path.dirname(prefix)
    assert Coordinator(config).resume_prefix() == prefix                                  # auto
    assert Coordinator(with_changes(config, resume="never")).resume_prefix() is None
    assert Coordinator(with_changes(config, resume=prefix)).resume_prefix() == prefix     # a prefix
    elsewhere = with_changes(config, checkpoint={"dir": str(tmp_path / "new")})
    assert Coordinator(with_changes(elsewhere, resume=directory)).resume_prefix() == prefix  # a directory
    with pytest.raises(RestoreError, match="no committed checkpoint"):
        Coordinator(with_changes(elsewhere, resume=str(tmp_path / "nowhere"))).resume_prefix()


@pytest.fixture(scope="module")
def four_worker_checkpoint(tmp_path_factory, ray_session):
    """A checkpoint written by M=4 workers after 10 steps (rmsprop: 2 slots per variable)."""
    from orchestrator.cluster.coordinator import Coordinator

    directory = str(tmp_path_factory.mktemp("m4") / "ckpt")
    config = make_config(directory, workers=4, steps=10, save_every=10, **RECIPE)
    coordinator = Coordinator(config)
    try:
        coordinator.start()
        result = coordinator.run()
        state = worker_state(coordinator)
    finally:
        coordinator.shutdown()
    return config, result.last_checkpoint, state


def test_checkpoint_has_one_shard_per_worker_and_the_job_records(four_worker_checkpoint):
    config, prefix, state = four_worker_checkpoint
    assert prefix.endswith("model.ckpt-10")
    for shard in range(4):
        assert os.path.exists(bundle.data_filename(prefix, shard, 4))
    reader = CheckpointReader(prefix)
    assert int(reader.get_tensor(GLOBAL_STEP_KEY)) == 10
    assert reader.has_tensor(ITERATOR_STATE_KEY) and reader.has_tensor(RNG_STATE_KEY)
    for name, value in state.items():
        assert reader.get_tensor(name).tobytes() == value.tobytes(), name
    assert reader.entry("dense/kernel").shard_id != reader.entry("dense_1/kernel").shard_id


@pytest.mark.parametrize("new_workers", [2, 3])
def test_reshard_four_workers_into_fewer_or_more(four_worker_checkpoint, run_coordinator, tmp_path, new_workers):
    config, prefix, saved = four_worker_checkpoint
    config = with_changes(config, workers={"min": new_workers, "max": new_workers}, resume=prefix,
                          checkpoint={"dir": str(tmp_path / "new")}, train={"steps": 12})
    coordinator = run_coordinator(config)
    assert coordinator.global_step == 10
    assert_bit_identical(worker_state(coordinator), saved)
    read = [set(info["read"]) for info in coordinator.restore_info]
    assert set.union(*read) == set(saved), "every saved tensor was read by its new owner"
    assert sum(len(r) for r in read) == len(saved), "no tensor was read twice"
    result = coordinator.run()  # and training goes on from there
    assert result.steps_completed == 12


def test_restore_into_another_model_is_refused(four_worker_checkpoint, tmp_path, ray_session):
    from orchestrator.cluster.coordinator import Coordinator

    config, prefix, _ = four_worker_checkpoint
    other = with_changes(config, model={"hidden": [8]}, resume=prefix, workers={"min": 1, "max": 1},
                         checkpoint={"dir": str(tmp_path / "other")})
    coordinator = Coordinator(other)
    try:
        with pytest.raises(RestoreError, match="different model.*hidden"):
            coordinator.start()
    finally:
        coordinator.shutdown()


@pytest.mark.tf
def test_tensorflow_reads_the_sharded_checkpoint_bit_exact(four_worker_checkpoint):
    tf = pytest.importorskip("tensorflow")
    _, prefix, saved = four_worker_checkpoint
    tf_reader = tf.train.load_checkpoint(prefix)
    ours = CheckpointReader(prefix)
    tf_shapes = tf_reader.get_variable_to_shape_map()
    assert set(tf_shapes) == set(ours.get_variable_to_shape_map())
    for name in tf_shapes:
        theirs, mine = tf_reader.get_tensor(name), ours.get_tensor(name)
        if mine.dtype == object:
            assert np.asarray(theirs, dtype=object).reshape(()).item() == mine.reshape(()).item(), name
        else:
            assert np.asarray(theirs).tobytes() == mine.tobytes(), name
    for name, value in saved.items():
        assert np.asarray(tf_reader.get_tensor(name)).tobytes() == value.tobytes(), name
    assert int(tf_reader.get_tensor("global_step")) == 10

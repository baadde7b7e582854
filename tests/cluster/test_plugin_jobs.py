"""A plug-in model written by the test, on npz and parquet files, local and on S3, with 1 and 2 workers.

Each case runs the job uninterrupted (the reference), reads its checkpoint with TensorFlow,
then runs it again stopped at step 8 and resumed, with a worker SIGKILLed at step 13: the
final checkpoint must be bit-identical to the reference. The plug-in module lives only in
the test's job directory; the workers import it from the copy the runtime ships them.
One case runs by default; the rest of the matrix is ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.checkpoint.reader import CheckpointReader
from orchestrator.cluster.supervisor import Supervisor
from orchestrator.config import load_config
from tests.plugin_fixtures import data_yaml, write_data, write_job, write_plugin

from .conftest import stop_then_resume_with_a_sigkill
from .test_supervisor import Recorder, read_all, restarts

STEPS, SAVE_EVERY, STOP_AT, KILL_AT = 20, 5, 8, 13
# parquet and S3 in the default run: test_plugin_multinode (parquet data and checkpoints on S3, M=2)
DEFAULT_CASES = {("npz", "local", 2)}
CASES = [pytest.param((fmt, where, m), marks=() if (fmt, where, m) in DEFAULT_CASES else pytest.mark.slow,
                      id=f"{fmt}-{where}-M{m}")
         for fmt in ("npz", "parquet") for where in ("local", "s3") for m in (1, 2)]


@pytest.fixture
def plugin_job(tmp_path, monkeypatch, request):
    """(write(checkpoint_subdir) -> loaded config) for one case; cwd is the job directory."""
    fmt, where, workers = request.param
    job = tmp_path / "job"
    module = write_plugin(job)
    options = None
    root = str(tmp_path / "data")
    if where == "s3":
        options = request.getfixturevalue("s3_options")
        root = request.getfixturevalue("s3_bucket") + "/data"
    train, evaluation = write_data(root, fmt, options)
    monkeypatch.chdir(job)

    def write(checkpoints: str):
        path = write_job(job, module, data_yaml(fmt, train, evaluation, options), workers=workers,
                         steps=STEPS, save_every=SAVE_EVERY, checkpoint_dir=checkpoints)
        return load_config(path)

    return write


@pytest.mark.parametrize("plugin_job", CASES, indirect=True)
def test_plugin_trains_checkpoints_resumes_and_recovers_bit_identical(plugin_job, ray_session):
    reference_config = plugin_job("reference")
    result = Supervisor(reference_config, Recorder()).run()
    assert result.steps_completed == STEPS and result.final_metrics["eval_accuracy"] > 0.5
    assert 0 <= result.final_metrics["accuracy"] <= 1
    reference = read_all(result.last_checkpoint)
    assert sorted(reference) == ["global_step", "linear/bias", "linear/bias/Adam", "linear/bias/Adam_1",
                                 "linear/weights", "linear/weights/Adam", "linear/weights/Adam_1"]
    _tensorflow_reads(result.last_checkpoint)

    config = plugin_job("interrupted")
    recorder, resumed = stop_then_resume_with_a_sigkill(config, STOP_AT, KILL_AT)
    assert recorder.steps[0] == STOP_AT + 1                      # resumed from the stop
    # SIGKILL when step 13 is reported: back to the step-10 save (the steps of the chunk that held 13 had
    # already run, so the last step reported before the restart is 13 or a later one of that chunk)
    (before, after), = restarts(recorder.steps)
    assert before >= KILL_AT and after == 11
    assert resumed.steps_completed == STEPS and resumed.failures_recovered == 1
    assert read_all(resumed.last_checkpoint) == reference         # bit-identical


def _tensorflow_reads(prefix: str) -> None:
    tf = pytest.importorskip("tensorflow")
    theirs, ours = tf.train.load_checkpoint(prefix), CheckpointReader(prefix)
    assert set(theirs.get_variable_to_shape_map()) == set(ours.get_variable_to_shape_map())
    for name in ("linear/weights", "linear/bias", "linear/weights/Adam", "global_step"):
        assert np.asarray(theirs.get_tensor(name)).tobytes() == ours.get_tensor(name).tobytes(), name

"""The shipped layer-library configs (digits CNN, character transformer) as Ray jobs with M=2.

Each config runs shrunk (few steps, small widths, through ``--set``-style overrides of the
shipped file) three ways: uninterrupted (the reference); stopped at step 5 and resumed; and,
in that resumed run, a worker SIGKILLed at step 9. The final checkpoint must equal the
reference bit for bit, and its variables carry the Keras names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.cluster.supervisor import Supervisor
from orchestrator.config import load_config

from .conftest import stop_then_resume_with_a_sigkill
from .test_supervisor import Recorder, read_all, restarts

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS, SAVE_EVERY, STOP_AT, KILL_AT = 12, 4, 5, 9
SHRINK = {
    "digits_cnn.yaml": ["model.layers=[{type: conv2d, filters: 4, kernel_size: 3, padding: same, activation: relu},"
                        " {type: max_pooling2d}, {type: flatten}, {type: dropout, rate: 0.3}, {type: dense}]",
                        "data.global_batch_size=32"],
    "char_transformer.yaml": ["model.d_model=16", "model.heads=2", "model.layers=1", "data.context=16",
                              "data.global_batch_size=8"],
}
NAMES = {"digits_cnn.yaml": {"conv2d/kernel", "conv2d/bias", "dense/kernel", "dense/bias"},
         "char_transformer.yaml": {"embedding/embeddings", "position_embedding/embeddings",
                                   "layer_normalization/gamma", "multi_head_attention/query/kernel",
                                   "multi_head_attention/attention_output/bias", "dense_1/kernel"}}


def _config(name: str, directory: Path):
    return load_config(CONFIGS / name, [*SHRINK[name], f"train.steps={STEPS}", "train.eval_every_steps=0",
                                        "train.log_every_steps=1",
                                        f"checkpoint.save_every_steps={SAVE_EVERY}", "checkpoint.fsync=false",
                                        "checkpoint.max_to_keep=0", f"checkpoint.dir={directory}", "workers=2",
                                        "resources.cpus_per_worker=0.25"])


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_layer_model_job_resumes_and_survives_a_sigkill_bit_identical(name, tmp_path, ray_session):
    result = Supervisor(_config(name, tmp_path / "reference"), Recorder()).run()
    assert result.steps_completed == STEPS
    reference = read_all(result.last_checkpoint)
    assert NAMES[name] <= set(reference)
    assert f"{sorted(NAMES[name])[0]}/Adam" in reference               # the optimizer's slots, Keras-named too

    config = _config(name, tmp_path / "interrupted")
    recorder, resumed = stop_then_resume_with_a_sigkill(config, STOP_AT, KILL_AT)
    assert recorder.steps[0] == STOP_AT + 1                                # resumed from the stop
    (killed, again), = restarts(recorder.steps)  # killed when KILL_AT was reported, after its chunk of steps ran
    assert killed >= KILL_AT and again == SAVE_EVERY * (KILL_AT // SAVE_EVERY) + 1  # back to the save
    assert resumed.steps_completed == STEPS and resumed.failures_recovered == 1
    assert read_all(resumed.last_checkpoint) == reference                  # bit-identical


@pytest.mark.parametrize("overrides, key, message", [
    (["model.input_shape=null"], "model.layers", "layers[0] (conv2d): needs [height, width, channels] inputs"),
    (["model.input_shape=[8, 4, 1]"], "model.input_shape", "holds 32 values; the data's examples hold 64"),
    (["model.layers=[{type: dense, units: 0}]"], "model.layers", "layers[0].units: must be a positive integer"),
])
def test_a_layer_list_that_does_not_fit_stops_before_the_job_naming_the_key(overrides, key, message, tmp_path):
    from orchestrator.cluster.preflight import build_on_cpu
    from orchestrator.engine.protocol import PluginError

    config = load_config(CONFIGS / "digits_cnn.yaml", [*overrides, f"checkpoint.dir={tmp_path}"])
    with pytest.raises(PluginError, match=re.escape(message)) as info:
        build_on_cpu(config)
    assert info.value.key == key

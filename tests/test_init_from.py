"""``init_from`` (warm start) through the CLI: checkpoints TF1's Saver, TF2 Keras and we wrote,
``validate`` naming every bad key at its file:line, and a real 2-worker job that warm-starts a
bigger model from a smaller one's TF1 checkpoint, logs each variable and starts at step 0
(resuming after a warm start: tests/cluster/test_warm_start.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.checkpoint import Saver, load_checkpoint
from orchestrator.checkpoint.manager import list_checkpoints
from orchestrator.engine.backend import get_backend
from orchestrator.engine.models import ModelSpec, build_model
from orchestrator.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from tests.test_cli import cli, run_cli

pytest.importorskip("tensorflow")
from tests.checkpoint import tf_fixtures  # noqa: E402  (imports TensorFlow)

DIGITS_INPUTS, CLASSES = 64, 10


def _small_mlp_values(seed: int = 5) -> dict[str, np.ndarray]:
    """A 64-16-10 MLP's weights, by TF1's layer names (what a TF1 script with tf.layers.dense saves)."""
    rng = np.random.default_rng(seed)
    return {"dense/kernel": rng.standard_normal((DIGITS_INPUTS, 16)).astype(np.float32),
            "dense/bias": rng.standard_normal(16).astype(np.float32),
            "dense_1/kernel": rng.standard_normal((16, CLASSES)).astype(np.float32),
            "dense_1/bias": rng.standard_normal(CLASSES).astype(np.float32)}


def _job(tmp_path: Path, init_from: dict, hidden=(16, 16), **extra) -> Path:
    """A digits job file with this ``init_from`` (written as YAML, so errors have lines)."""
    job = {"name": "warm", "run_dir": str(tmp_path / "run"), "model": {"kind": "mlp", "hidden": list(hidden)},
           "data": {"dataset": "digits", "global_batch_size": 64}, "workers": 2,
           "train": {"steps": 4, "log_every_steps": 2, "eval_every_steps": 0},
           "checkpoint": {"dir": str(tmp_path / "ckpt"), "save_every_steps": 2},
           "logging": {"progress": "plain", "tensorboard": False}, "init_from": init_from, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def tf1_small(tmp_path_factory) -> tuple[str, dict]:
    values = _small_mlp_values()
    return tf_fixtures.write_tf1_variables(str(tmp_path_factory.mktemp("tf1")), values), values


GROW = {"variables": ["dense/*", "dense_2/*"],  # 64-16-10 -> 64-16-16-10: the new middle layer starts fresh
        "rename": {"dense_1/kernel": "dense_2/kernel", "dense_1/bias": "dense_2/bias"}}


# ---------------------------------------------------------------------------- validate
def test_validate_accepts_a_tf1_checkpoint_into_a_bigger_model(tmp_path, tf1_small, capsys):
    code, out, err = cli(capsys, "validate", str(_job(tmp_path, {"checkpoint": tf1_small[0], **GROW})))
    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert lines[0].startswith("OK: warm:")
    prefix = tf1_small[0]
    assert lines[1] == f"init_from {prefix}: 4 variable(s) taken, 2 initialised fresh; training starts at step 0"
    assert f"init_from {prefix}: took dense_2/bias <- dense_1/bias [10]" in lines
    assert f"init_from {prefix}: left fresh dense_1/kernel (not selected by init_from.variables)" in lines


@pytest.mark.parametrize("change, key, needle, message", [
    ({"variables": ["dense/*", "dens_3/*"]}, "init_from.variables[1]", "  variables:",
     "'dens_3/*' matches no model variable; the model's variables: dense/bias"),
    ({"variables": ["dense_1/kernel"], "rename": {}}, "init_from.variables", "  variables:",
     "checkpoint tensor 'dense_1/kernel' is float32[16, 10] but model variable 'dense_1/kernel' is float32[16, 16]"),
    ({"rename": {"dense_1/kernal": "dense_2/kernel"}}, "init_from.rename.dense_1/kernal", "dense_1/kernal",
     "'dense_1/kernal' is not in the checkpoint; did you mean 'dense_1/kernel'"),
    ({"rename": {"dense_1/kernel": "dense_9/kernel"}}, "init_from.rename.dense_1/kernel", "dense_1/kernel:",
     "renames to 'dense_9/kernel', which is not a model variable"),
    ({"variables": ["dense_1/*"], "rename": {"dense_1/kernel": "dense_2/kernel", "dense_1/bias": "dense_2/bias"}},
     "init_from.variables[0]", "  variables:", "'dense_1/*' selects model variables that are not in the checkpoint"),
    ({"checkpoint": "MISSING"}, "init_from.checkpoint", "  checkpoint: ", "cannot read"),
])
def test_validate_names_the_bad_init_from_key_at_its_line(tmp_path, tf1_small, capsys, change, key, needle, message):
    init_from = {"checkpoint": tf1_small[0], **GROW, **change}
    if init_from["checkpoint"] == "MISSING":
        init_from["checkpoint"] = str(tmp_path / "nothing-here")
    path = _job(tmp_path, init_from)
    code, out, err = cli(capsys, "validate", str(path))
    assert code == EXIT_BAD_INPUT and out == ""
    line = _line_of(path, needle)
    assert err.startswith(f"error: {path}:{line}: {key}: "), err
    assert message in err, err


def test_init_from_and_a_resume_path_exclude_each_other(tmp_path, tf1_small, capsys):
    path = _job(tmp_path, {"checkpoint": tf1_small[0]}, resume=tf1_small[0])
    code, _, err = cli(capsys, "validate", str(path))
    assert code == EXIT_BAD_INPUT
    assert err.startswith(f"error: {path}:{_line_of(path, 'init_from:')}: init_from: resume: <checkpoint> continues")


def test_validate_takes_keras_weights_by_rename(tmp_path, capsys):
    prefix, _ = tf_fixtures.write_keras_weights(str(tmp_path / "keras"), DIGITS_INPUTS, 16, CLASSES)
    names = [f"layer_with_weights-{i}/{w}/.ATTRIBUTES/VARIABLE_VALUE" for i in (0, 1) for w in ("kernel", "bias")]
    ours = ["dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"]
    path = _job(tmp_path, {"checkpoint": str(tmp_path / "keras"), "rename": dict(zip(names, ours))}, hidden=[16])
    code, _, err = cli(capsys, "validate", str(path))
    assert code == EXIT_OK, err
    # without the renames nothing matches: the default glob says what to give
    path = _job(tmp_path, {"checkpoint": prefix}, hidden=[16])
    code, _, err = cli(capsys, "validate", str(path))
    assert code == EXIT_BAD_INPUT and "init_from.variables[0]: '*' selects model variables that are not in the " \
                                      "checkpoint" in err and "init_from.rename" in err


# ---------------------------------------------------------------------------- a real job
def _tensors(ckpt: Path) -> dict[str, np.ndarray]:
    with load_checkpoint(str(ckpt)) as reader:
        return reader.get_tensors()


def test_job_warm_starts_a_bigger_model_from_a_tf1_checkpoint(tmp_path, tf1_small):
    prefix, source = tf1_small
    # a learning rate too small to move a weight visibly: what the job saves is what it started with
    path = _job(tmp_path, {"checkpoint": prefix, **GROW}, optimizer={"learning_rate": 1e-30})
    env = {"RAY_ADDRESS": "local"}
    first = run_cli("train", str(path), cwd=tmp_path, env=env, timeout=300)
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    assert [i.step for i in list_checkpoints(str(tmp_path / "ckpt"))] == [2, 4]  # started at step 0, not TF's 7
    saved = _tensors(tmp_path / "ckpt")
    for ours, theirs in [("dense/kernel", "dense/kernel"), ("dense/bias", "dense/bias"),
                         ("dense_2/kernel", "dense_1/kernel"), ("dense_2/bias", "dense_1/bias")]:
        np.testing.assert_allclose(saved[ours], source[theirs], rtol=1e-6, atol=1e-20)
    fresh = build_model(ModelSpec(input_dim=DIGITS_INPUTS, hidden=(16, 16), num_classes=CLASSES),
                        get_backend("cpu"), seed=0)
    initial = {v.name: v.numpy() for v in fresh.variables}
    for name in ("dense_1/kernel", "dense_1/bias"):  # not selected: the job's own initialisation
        np.testing.assert_allclose(saved[name], initial[name], rtol=1e-6, atol=1e-20)
    log = (tmp_path / "run" / "train.log").read_text()
    for line in (f"init_from {prefix}: took dense_2/kernel <- dense_1/kernel [16, 10]",
                 f"init_from {prefix}: left fresh dense_1/bias (not selected by init_from.variables)",
                 f"init_from {prefix}: 4 variable(s) taken, 2 initialised fresh; training starts at step 0"):
        assert line in log, line



def test_init_from_our_own_checkpoint_and_exported_file(tmp_path, capsys):
    """Ours: a Saver checkpoint without a structure record (optimizer slots in it are never taken)."""
    small = build_model(ModelSpec(input_dim=DIGITS_INPUTS, hidden=(16,), num_classes=CLASSES), get_backend("cpu"), 3)
    from orchestrator.checkpoint import Variable
    slot = Variable("dense/kernel/RMSProp", np.ones((DIGITS_INPUTS, 16), np.float32))
    Saver(small.variables + [slot]).save(str(tmp_path / "ours" / "model.ckpt"), global_step=9)
    code, _, err = cli(capsys, "validate", str(_job(tmp_path, {"checkpoint": str(tmp_path / "ours")}, hidden=[16])))
    assert code == EXIT_OK, err
    code, _, err = cli(capsys, "export", str(tmp_path / "ours"), "--format", "safetensors",
                       "-o", str(tmp_path / "small.safetensors"))
    assert code == EXIT_OK, err
    path = _job(tmp_path, {"checkpoint": str(tmp_path / "small.safetensors"), "variables": ["dense/*"]})
    code, _, err = cli(capsys, "validate", str(path))
    assert code == EXIT_OK, err


def test_resume_of_a_checkpoint_no_job_wrote_points_to_init_from_before_anything_starts(tmp_path, tf1_small):
    job = {"name": "warm", "run_dir": str(tmp_path / "run"), "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = run_cli("train", str(path), "--set", f"resume={tf1_small[0]}", cwd=tmp_path, env={"RAY_ADDRESS": "local"})
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: resume: {tf1_small[0]} has no _MODEL_STRUCTURE record") and "init_from:" in last
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()

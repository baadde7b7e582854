"""Every bad plug-in or data input, through the CLI: one line naming file:line and key, exit 2,
nothing started or written; problems only visible at run time exit 1 and keep the last good
checkpoint as the latest.

The exit-2 cases call ``orchestrator.cli.main`` in this process (the same code path as the
command, without a Python start-up per case); one case runs the real command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.checkpoint.state import latest_checkpoint
from orchestrator.cli import main
from orchestrator.cluster import shipping
from orchestrator.config import load_config
from orchestrator.exit_codes import EXIT_BAD_INPUT, EXIT_FAILURE
from tests.plugin_fixtures import data_yaml, encode, make_arrays, write_data, write_job, write_plugin

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A job directory with the test plug-in and npz data; cwd is the job directory."""
    directory = tmp_path / "job"
    module = write_plugin(directory)
    train, evaluation = write_data(str(directory / "data"), "npz")
    monkeypatch.chdir(directory)

    class Job:
        path = directory
        name = module

        @staticmethod
        def write(factory="build", data=None, extra="", **kwargs) -> Path:
            block = data if data is not None else data_yaml("npz", train, evaluation)
            return write_job(directory, module, block, factory=factory, extra=extra, **kwargs)

    return Job


def bad_input(capsys, config: Path, *args: str) -> str:
    """Runs ``train`` and returns its one error line; asserts exit 2 and that nothing was written."""
    code = main(["train", str(config), *args])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1 and re.match(rf"error: {re.escape(str(config))}:\d+: (model|data|optimizer|code)\.\w+: ",
                                        lines[0]), err  # file:line: key:
    assert not (config.parent / "runs").exists() and not (config.parent / "ckpt").exists()
    return lines[0]


def line_of(config: Path, text: str) -> int:
    return next(i for i, line in enumerate(config.read_text().splitlines(), 1) if text in line)


# ---------------------------------------------------------------------------- the model factory
def test_factory_not_importable_shows_the_import_error(job, capsys):
    config = job.write()
    config.write_text(config.read_text().replace(f"{job.name}:build", "no_such_module_xyz:build"))
    error = bad_input(capsys, config)
    assert f":{line_of(config, 'factory:')}: model.factory:" in error
    assert "No module named 'no_such_module_xyz'" in error


def test_module_that_fails_to_import_shows_its_error(job, capsys):
    (job.path / "broken_mod_q1.py").write_text("def build(:\n")
    config = job.write()
    config.write_text(config.read_text().replace(f"{job.name}:build", "broken_mod_q1:build"))
    error = bad_input(capsys, config)
    assert "model.factory" in error and "SyntaxError" in error


def test_missing_attribute_and_not_callable(job, capsys):
    error = bad_input(capsys, job.write(factory="build_nowhere"))
    assert "model.factory" in error and "has no attribute 'build_nowhere'" in error
    error = bad_input(capsys, job.write(factory="build_not_callable"))
    assert "model.factory" in error and "is not callable: it is int 42" in error


def test_factory_raising_in_its_constructor(job, capsys):
    config = job.write(factory="build_raises", args="{hidden: -3}")
    error = bad_input(capsys, config)
    assert f":{line_of(config, 'factory:')}: model.factory:" in error
    assert "raised ValueError: hidden must be positive, got -3" in error


def test_model_without_a_protocol_method(job, capsys):
    error = bad_input(capsys, job.write(factory="build_no_evaluate"))
    assert "model.factory" in error and "without the protocol method(s) ['evaluate']" in error


@pytest.mark.parametrize("factory, message", [
    ("build_wrong_name", "no gradient for variable(s) ['linear/bias']; gradient(s) ['linear/biases'] name no variable"),
    ("build_wrong_shape", "gradient of 'linear/weights' has shape [3, 12], the variable has [12, 3]"),
    ("build_wrong_dtype", "gradient of 'linear/bias' has dtype float64, the variable has float32"),
])
def test_grads_that_do_not_match_the_variables_stop_before_the_first_step(job, capsys, factory, message):
    error = bad_input(capsys, job.write(factory=factory))
    assert "model.factory" in error and message in error


def test_factory_name_syntax_is_a_config_error(job, capsys):
    config = job.write()
    config.write_text(config.read_text().replace(f"{job.name}:build", f"{job.name}.build"))
    error = bad_input(capsys, config)
    assert "model.factory: must be 'module:callable' (e.g. my_models:build) (got" in error


# ---------------------------------------------------------------------------- other factories
def test_data_and_optimizer_factories_that_break_the_contract(job, capsys):
    (job.path / "extras_q2.py").write_text(
        "def load(*, seed):\n    return 'not arrays'\n\n"
        "class NoApply:\n    def create_slots(self, variable):\n        return []\n\n"
        "def opt(*, learning_rate):\n    return NoApply()\n")
    config = job.write(data="  factory: extras_q2:load")
    error = bad_input(capsys, config)
    assert f":{line_of(config, 'extras_q2:load')}: data.factory:" in error and "must return" in error
    config = job.write(extra="")
    config.write_text(config.read_text().replace("optimizer: {name: adam, learning_rate: 0.05}",
                                                 "optimizer: {factory: 'extras_q2:opt', learning_rate: 0.05}"))
    error = bad_input(capsys, config)
    assert "optimizer.factory" in error and "without method(s) ['apply']" in error


# ---------------------------------------------------------------------------- data files
def npz_job(job, tmp_name: str, x, y, **data_keys) -> Path:
    path = job.path / tmp_name
    path.write_bytes(encode("npz", x, y))
    keys = "".join(f"\n  {k}: {v}" for k, v in data_keys.items())
    return job.write(data=f"  format: npz\n  path: {path}{keys}")


def test_missing_and_unreadable_data_files(job, capsys):
    config = job.write(data=f"  format: npz\n  path: {job.path / 'nowhere.npz'}")
    error = bad_input(capsys, config)
    assert f":{line_of(config, 'path:')}: data.path:" in error and "nowhere.npz: no such file" in error
    (job.path / "garbage.npz").write_bytes(b"\x00not a zip archive" * 10)
    error = bad_input(capsys, job.write(data=f"  format: npz\n  path: {job.path / 'garbage.npz'}"))
    assert "data.path" in error and "not a readable .npz file" in error
    error = bad_input(capsys, job.write(data=f"  format: parquet\n  path: {job.path / 'garbage.npz'}"))
    assert "data.path" in error and "not a readable parquet file" in error
    error = bad_input(capsys, job.write(data=f"  format: csv\n  path: {job.path / 'data'}"))
    assert "data.path" in error and "is a directory; expected a file" in error


def test_a_key_or_column_that_does_not_exist_lists_the_ones_that_do(job, capsys):
    x, y = make_arrays(50)
    config = npz_job(job, "d.npz", x, y, features="pixels")
    error = bad_input(capsys, config)
    assert f":{line_of(config, 'features:')}: data.features:" in error and "no array 'pixels'; it has ['x', 'y']" in error
    parquet = job.path / "d.parquet"
    parquet.write_bytes(encode("parquet", x, y))
    config = job.write(data=f"  format: parquet\n  path: {parquet}\n  labels: target")
    error = bad_input(capsys, config)
    assert f":{line_of(config, 'labels:')}: data.labels:" in error
    assert "no column 'target'; its columns are ['f0', 'f1'" in error


def test_features_and_labels_of_different_lengths(job, capsys):
    x, y = make_arrays(50)
    error = bad_input(capsys, npz_job(job, "d.npz", x, y[:40]))
    assert "data.labels" in error and "features (data.features) have 50 rows but labels (data.labels) 40" in error
    # with eval_fraction the split took len(labels) rows of each and trained on misaligned pairs (exit 0)
    error = bad_input(capsys, npz_job(job, "e.npz", x, y[:40], eval_fraction=0.2))
    assert "data.labels" in error and "features (data.features) have 50 rows but labels (data.labels) 40" in error


def test_labels_outside_the_classes(job, capsys):
    x, y = make_arrays(50)
    error = bad_input(capsys, npz_job(job, "d.npz", x, y, num_classes=2))
    assert "data.labels" in error and "label 2 at row" in error and "outside [0, 2)" in error
    y = y.copy()
    y[7] = -1
    error = bad_input(capsys, npz_job(job, "e.npz", x, y))
    assert "label -1 at row 7 is outside [0, num_classes)" in error


def test_nan_or_inf_in_features(job, capsys):
    x, y = make_arrays(50)
    x[11, 3], x[20, 0] = np.nan, np.inf
    error = bad_input(capsys, npz_job(job, "d.npz", x, y))
    assert "data.features" in error and "NaN or inf in 2 row(s), the first is row 11" in error


def test_code_too_large_to_ship(job, capsys):
    (job.path / "weights.bin").write_bytes(os.urandom(3 << 20))
    error = bad_input(capsys, job.write(extra="code: {max_size_mb: 1}"))
    assert "code.max_size_mb" in error and "over code.max_size_mb=1" in error and "weights.bin (3.0 MiB)" in error


def test_what_is_never_shipped(job, monkeypatch):
    """.git, runs/, the checkpoint directory, code.excludes and .rayignore stay home; under
    ``ray job submit --working-dir`` Ray ships the directory and the runtime ships nothing."""
    big = os.urandom(2 << 20)
    for rel in (".git/objects/pack.bin", "runs/old/train.log", "ckpt/model.ckpt-1.data-00000-of-00001",
                "scratch/tmp.bin", "ignored/x.bin"):
        (job.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (job.path / rel).write_bytes(big)
    (job.path / ".rayignore").write_text("ignored/\n")
    config = load_config(job.write(extra="code: {max_size_mb: 1, excludes: [scratch/]}"))
    shipped = {os.path.relpath(p, job.path) for p in shipping.shipped_files(
        str(job.path), shipping.excludes(config, str(job.path)))}
    assert f"{job.name}.py" in shipped and "job.yaml" in shipped
    assert not [p for p in shipped if p.split(os.sep)[0] in (".git", "runs", "ckpt", "scratch", "ignored")], shipped
    assert shipping.check_size(config) < 1 << 20
    (job.path / "weights.bin").write_bytes(big)
    with pytest.raises(shipping.CodeTooLargeError, match=r"weights\.bin \(2\.0 MiB\)"):
        shipping.check_size(config)
    monkeypatch.setenv(shipping.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": str(job.path)}}))
    assert shipping.check_size(config) == 0
    assert shipping.runtime_env(config, {"working_dir": str(job.path)}) is None


def test_the_command_itself_exits_2_with_one_line(job):
    config = job.write(factory="build_raises")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(config)], cwd=job.path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines() == [
        f"error: {config}:{line_of(config, 'factory:')}: model.factory: {job.name}:build_raises "
        f"raised ValueError: hidden must be positive, got None"]
    assert not (job.path / "runs").exists()


# ---------------------------------------------------------------------------- only seen at run time
@pytest.mark.parametrize("factory, message", [
    ("build_late_wrong_gradient", "GradientError: step 6: loss_and_grads: gradient of 'linear/bias' has shape [2]"),
    ("build_nan_loss", "NonFiniteLossError: training loss is nan at step 8; the job stops"),
])
def test_run_time_failures_exit_1_and_keep_the_last_good_checkpoint(job, capsys, ray_session, factory, message):
    config = job.write(factory=factory, steps=12, save_every=5, workers=1)
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == EXIT_FAILURE
    assert message in err
    latest = latest_checkpoint(str(job.path / "ckpt"))
    assert latest.endswith("model.ckpt-5")
    assert sorted(p.name for p in (job.path / "ckpt").iterdir() if ".index" in p.name) == ["model.ckpt-5.index"]


# ---------------------------------------------------------------------------- a directory of shards
def shard_job(job, shards, extra: str = "") -> Path:
    """A job on a directory of npz shards, each given as (x, y)."""
    directory = job.path / "shards"
    directory.mkdir(exist_ok=True)
    for i, (x, y) in enumerate(shards):
        (directory / f"part-{i}.npz").write_bytes(encode("npz", x, y))
    return job.write(data=f"  format: npz\n  path: {directory}{extra}")


@pytest.mark.parametrize("case, key, line, message", [  # line: where the error points (a key not written: data:)
    ("no-shards", "data.path", "path:", "no .npz shard files (format npz); it holds ['notes.txt']"),
    ("label-outside", "data.labels", "data:", "part-2.npz: label -1 at row 4 is outside [0, num_classes)"),
    ("nan-in-a-shard", "data.features", "data:", "part-1.npz: features hold NaN or inf in 1 row(s), the first is row 3"),
    ("shards-disagree", "data.features", "data:", "part-1.npz: features [N, 11] float32 with int64 labels, but"),
    ("fewer-shards-than-workers", "data.path", "path:", "1 shard file(s) for 2 workers: each worker reads its own"),
    ("batch-over-a-workers-share", "data.global_batch_size", "global_batch_size:",
     "with 2 workers, worker 1 has 10 example(s) but takes 15 per step"),
    ("eval-fraction", "data.eval_fraction", "eval_fraction:", "is a directory of shards, which is never held whole"),
])
def test_bad_shard_directories(job, capsys, case, key, line, message):
    x, y = make_arrays(100)
    parts = [(x[:40], y[:40]), (x[40:60], y[40:60]), (x[60:], y[60:])]
    extra = ""
    if case == "no-shards":
        parts = []
        (job.path / "shards").mkdir()
        (job.path / "shards" / "notes.txt").write_text("no data here")
    elif case == "label-outside":
        parts[2][1][4] = -1
    elif case == "nan-in-a-shard":
        parts[1][0][3, 5] = np.nan
    elif case == "shards-disagree":
        parts[1] = (parts[1][0][:, :11], parts[1][1])
    elif case == "fewer-shards-than-workers":
        parts = parts[:1]
    elif case == "eval-fraction":
        extra = "\n  eval_fraction: 0.1"
    elif case == "batch-over-a-workers-share":
        parts = [(x[:40], y[:40]), (x[40:50], y[40:50]), (x[50:], y[50:])]  # worker 1 reads part-1 only
    config = shard_job(job, parts, extra)
    error = bad_input(capsys, config)
    assert f":{line_of(config, line)}: {key}: " in error and message in error, error

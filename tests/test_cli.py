"""The ``orchestrator`` CLI as an operator runs it: subprocesses, real checkpoints, real Ray.

Checkpoints for ls/inspect/export are written with the library's own CheckpointManager;
the train tests run ``configs/quickstart.yaml`` end to end (train, checkpoint, resume).
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
import yaml

from orchestrator import __version__
from orchestrator.checkpoint.manager import CheckpointManager, list_checkpoints
from orchestrator.checkpoint.reader import load_checkpoint
from orchestrator.checkpoint.structure import structure_tensors
from orchestrator.exit_codes import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SUBCOMMANDS = ["train", "validate", "inspect", "ls", "export"]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 60,
            module: str = "orchestrator.cli") -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- fixtures
def _tensors(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    params = {"dense/kernel": rng.standard_normal((64, 32)).astype(np.float32),
              "dense/bias": rng.standard_normal(32).astype(np.float32),
              "dense_1/kernel": rng.standard_normal((32, 10)).astype(np.float32),
              "dense_1/bias": np.zeros(10, np.float32)}
    slots = {f"{k}/RMSProp": np.ones_like(v) for k, v in params.items()}
    spec = {"kind": "mlp", "input_dim": 64, "hidden": [32], "num_classes": 10}
    return {**params, **slots, "global_step": np.array(step, np.int64), **structure_tensors(spec, list(params))}


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ckpt_dir(tmp_path) -> Path:
    """Three saves (steps 10, 20, 30) with max_to_keep=2: steps 20 and 30 remain, 2 shards each."""
    directory = tmp_path / "ckpt"
    clock = Clock()
    manager = CheckpointManager(str(directory), max_to_keep=2, clock=clock)
    for step in (10, 20, 30):
        clock.now += 60
        manager.save(_tensors(step), step, metrics={"loss": 1.0 / step}, num_shards=2)
    return directory


# ---------------------------------------------------------------------------- help / version / validate
def test_version():
    proc = run_cli("--version")
    assert proc.returncode == EXIT_OK and proc.stdout.strip() == f"orchestrator {__version__}"


@pytest.mark.parametrize("args", [[], *[[c] for c in SUBCOMMANDS]], ids=["top", *SUBCOMMANDS])
def test_help_everywhere(args):
    proc = run_cli(*args, "--help")
    assert proc.returncode == EXIT_OK
    assert proc.stdout.startswith("usage: orchestrator" + (f" {args[0]}" if args else ""))
    if not args:
        for command in SUBCOMMANDS:
            assert command in proc.stdout
        assert "3 preempted" in proc.stdout


def test_usage_errors_exit_2():
    assert run_cli().returncode == EXIT_BAD_INPUT
    assert run_cli("frobnicate").returncode == EXIT_BAD_INPUT
    proc = run_cli("export", "somewhere")  # --format is required
    assert proc.returncode == EXIT_BAD_INPUT and "--format" in proc.stderr


def test_python_dash_m_orchestrator_validates_the_quickstart():
    proc = run_cli("validate", str(QUICKSTART), module="orchestrator")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.startswith("OK: quickstart: mlp 256-256 on digits, 2 worker(s), 300 steps")


def test_validate_show_prints_the_resolved_config():
    proc = run_cli("validate", str(QUICKSTART), "--show", "--set", "train.steps=42")
    assert proc.returncode == EXIT_OK
    shown = yaml.safe_load(proc.stdout.split("\n", 1)[1])
    assert shown["train"]["steps"] == 42 and shown["workers"] == {"min": 2, "max": 2}


# ---------------------------------------------------------------------------- ls
def test_ls_table(ckpt_dir):
    proc = run_cli("ls", str(ckpt_dir))
    assert proc.returncode == EXIT_OK, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["STEP", "TIME", "(UTC)", "SIZE", "SHARDS", "KEPT", "BECAUSE", "PREFIX"]
    assert [r.split()[0] for r in rows] == ["20", "30"]
    infos = list_checkpoints(str(ckpt_dir))
    for row, info in zip(rows, infos):
        cells = re.split(r"\s{2,}", row)
        assert cells[2] == f"{info.size_bytes / 1024:.1f} KiB"
        assert cells[3] == "2"
        assert cells[4] == ", ".join(info.reasons) and "latest" in cells[4]
        assert cells[5] == f"model.ckpt-{info.step}"
    assert rows[0].split()[1:3] == ["2023-11-14", "22:15:20"]  # 1_700_000_000 + 120 s, UTC


def test_ls_json(ckpt_dir):
    proc = run_cli("ls", str(ckpt_dir), "--json")
    listed = json.loads(proc.stdout)
    assert [(r["step"], r["num_shards"]) for r in listed] == [(20, 2), (30, 2)]
    assert [r["size_bytes"] for r in listed] == [i.size_bytes for i in list_checkpoints(str(ckpt_dir))]
    assert all(os.path.exists(r["prefix"] + ".index") for r in listed)


def test_ls_empty_directory(tmp_path):
    proc = run_cli("ls", str(tmp_path))
    assert proc.returncode == EXIT_OK and "no committed checkpoints" in proc.stdout


# ---------------------------------------------------------------------------- inspect
def test_inspect_table_lists_every_tensor(ckpt_dir):
    proc = run_cli("inspect", str(ckpt_dir))
    assert proc.returncode == EXIT_OK, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()[1:-1]]
    assert names == sorted(_tensors(30))
    kernel = next(l for l in proc.stdout.splitlines() if l.startswith("dense/kernel "))
    assert kernel.split()[1:4] == ["float32", "[64,", "32]"]
    assert proc.stdout.splitlines()[-1].startswith(f"{len(_tensors(30))} tensors")


def test_inspect_json_matches_the_reader(ckpt_dir):
    prefix = str(ckpt_dir / "model.ckpt-20")
    doc = json.loads(run_cli("inspect", prefix, "--json").stdout)
    reader = load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    assert {t["name"]: tuple(t["shape"]) for t in doc["tensors"]} == {k: tuple(v) for k, v in shapes.items()}


def test_inspect_prints_tensor_values(ckpt_dir):
    proc = run_cli("inspect", str(ckpt_dir / "model.ckpt-30"), "--tensor", "dense_1/bias", "--tensor", "global_step")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "dense_1/bias (float32, [10]):\n[0., 0., 0., 0., 0., 0., 0., 0., 0., 0.]" in proc.stdout
    assert "global_step (int64, []):\n30" in proc.stdout
    every = run_cli("inspect", str(ckpt_dir), "--all-tensors").stdout
    assert every.count("):\n") == len(_tensors(30))


def test_inspect_missing_path_is_bad_input(tmp_path):
    proc = run_cli("inspect", str(tmp_path / "nothing" / "model.ckpt-1"))
    assert proc.returncode == EXIT_BAD_INPUT
    assert str(tmp_path / "nothing") in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_inspect_unknown_tensor_names_it(ckpt_dir):
    proc = run_cli("inspect", str(ckpt_dir), "--tensor", "no/such/tensor")
    assert proc.returncode != EXIT_OK and "no/such/tensor" in proc.stderr


def test_inspect_corrupt_index_is_bad_input(ckpt_dir):
    index = ckpt_dir / "model.ckpt-30.index"
    raw = bytearray(index.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    index.write_bytes(bytes(raw))
    proc = run_cli("inspect", str(ckpt_dir / "model.ckpt-30"))
    assert proc.returncode == EXIT_BAD_INPUT  # a checkpoint's contents are input, like a missing shard
    assert "model.ckpt-30.index" in proc.stderr and proc.stderr.startswith("error: ")


def test_inspect_json_and_tensor_conflict(ckpt_dir):
    proc = run_cli("inspect", str(ckpt_dir), "--json", "--all-tensors")
    assert proc.returncode == EXIT_BAD_INPUT and "--json" in proc.stderr


def test_inspect_and_ls_on_s3_with_storage_options(s3_bucket, s3_server, tmp_path):
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    url = f"{s3_bucket}/ckpt"
    CheckpointManager(url, max_to_keep=2, storage_options=opts).save(_tensors(5), 5, num_shards=2)
    args = ["--storage-option", "key=testing", "--storage-option", "secret=${ORCH_TEST_S3_SECRET}",
            "--storage-option", f"client_kwargs.endpoint_url={s3_server}",
            "--storage-option", "client_kwargs.region_name=us-east-1"]
    env = {"ORCH_TEST_S3_SECRET": "testing"}
    listed = json.loads(run_cli("ls", url, "--json", *args, env=env).stdout)
    assert [(r["step"], r["num_shards"]) for r in listed] == [(5, 2)]
    proc = run_cli("inspect", url, "--tensor", "global_step", *args, env=env)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "global_step (int64, []):\n5" in proc.stdout


# ---------------------------------------------------------------------------- export
def test_export_safetensors_of_latest(ckpt_dir, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    out = tmp_path / "model.safetensors"
    proc = run_cli("export", str(ckpt_dir), "--format", "safetensors", "-o", str(out))
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "model.ckpt-30" in proc.stdout
    loaded = safetensors_numpy.load_file(str(out))
    expected = {k: v for k, v in _tensors(30).items() if k.startswith("dense") and "RMSProp" not in k}
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_export_default_output_name(ckpt_dir, tmp_path):
    proc = run_cli("export", str(ckpt_dir / "model.ckpt-20"), "--format", "safetensors", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert (tmp_path / "model.ckpt-20.safetensors").is_file()


def test_export_empty_directory_is_bad_input(tmp_path):
    proc = run_cli("export", str(tmp_path), "--format", "safetensors")
    assert proc.returncode == EXIT_BAD_INPUT and str(tmp_path) in proc.stderr


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (cheaper than a subprocess): exit code, stdout, stderr."""
    from orchestrator.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("part", [".index", ".data-00001-of-00002"])
def test_a_file_of_a_checkpoint_is_named_with_its_prefix_not_as_tensorflow_v1(ckpt_dir, capsys, part):
    """`inspect model.ckpt-30.index` said 'a TensorFlow V1-format checkpoint' (an index is a table too)."""
    prefix = ckpt_dir / "model.ckpt-30"
    for command in (["inspect"], ["export", "--format", "safetensors", "-o", str(ckpt_dir.parent / "x.safetensors")]):
        code, out, err = cli(capsys, command[0], f"{prefix}{part}", *command[1:])
        assert code == EXIT_BAD_INPUT and out == "", err
        assert "V1" not in err and f"give its prefix {prefix}" in err, err
        assert err.startswith(f"error: {prefix}{part} is a file of the checkpoint {prefix}"), err


def test_export_to_a_path_under_a_file_exits_2_naming_the_output(ckpt_dir, capsys):
    """-o is user input: a file where its directory should be was exit 1 with a bare FileExistsError."""
    blocker = ckpt_dir.parent / "notes.txt"
    blocker.write_text("a file\n")
    out = blocker / "model.safetensors"
    code, stdout, err = cli(capsys, "export", str(ckpt_dir), "--format", "safetensors", "-o", str(out))
    assert code == EXIT_BAD_INPUT and stdout == "", err
    assert err.startswith(f"error: cannot write {out}: "), err
    assert blocker.read_text() == "a file\n"


def test_inspect_tensor_prints_only_that_tensor_with_the_table_dtype_name(ckpt_dir, capsys):
    code, out, _ = cli(capsys, "inspect", str(ckpt_dir), "--tensor", "dense_1/bias")
    assert code == EXIT_OK and out == "dense_1/bias (float32, [10]):\n[0., 0., 0., 0., 0., 0., 0., 0., 0., 0.]\n"
    _, table, _ = cli(capsys, "inspect", str(ckpt_dir))
    row = next(line for line in table.splitlines() if line.startswith("_MODEL_STRUCTURE "))
    _, value, _ = cli(capsys, "inspect", str(ckpt_dir), "--tensor", "_MODEL_STRUCTURE")
    assert row.split()[1] == "string" and value.startswith("_MODEL_STRUCTURE (string, []):\n")


def test_inspect_tensor_typo_gets_close_matches_and_prints_nothing(ckpt_dir, capsys):
    code, out, err = cli(capsys, "inspect", str(ckpt_dir), "--tensor", "global_step", "--tensor", "dense_1/bais")
    assert code == EXIT_BAD_INPUT and out == ""
    assert err.startswith("error: tensor 'dense_1/bais' not found") and "did you mean 'dense_1/bias'" in err


def test_export_into_a_directory(ckpt_dir, tmp_path, capsys):
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    for target in (str(out_dir), str(out_dir) + "/"):
        code, out, err = cli(capsys, "export", str(ckpt_dir), "--format", "safetensors", "-o", target)
        assert code == EXIT_OK, err
        assert out.startswith(f"wrote {out_dir / 'model.ckpt-30.safetensors'} (4 tensors")
    code, _, err = cli(capsys, "export", str(ckpt_dir), "--format", "safetensors", "-o", str(tmp_path / "nope") + "/")
    assert code == EXIT_BAD_INPUT and "directory does not exist" in err and not (tmp_path / "nope").exists()


def _saved_model(directory: Path, with_structure: bool):
    """A model and one optimizer slot saved with the documented Saver API."""
    from orchestrator.checkpoint import Saver, Variable
    from orchestrator.engine.backend import get_backend
    from orchestrator.engine.models import ModelSpec, build_model

    model = build_model(ModelSpec(input_dim=6, hidden=(5,), num_classes=3), get_backend("cpu"), seed=3)
    slot = Variable("dense/kernel/Adam", np.ones((6, 5), np.float32), trainable=False)
    saver = Saver(model.variables + [slot], structure=model if with_structure else None)
    saver.save(str(directory / "model.ckpt"), global_step=40)
    return model


def test_export_round_trip_inspect_and_load_model_of_the_file(tmp_path, capsys):
    import orchestrator

    model = _saved_model(tmp_path / "ckpt", with_structure=True)
    out = tmp_path / "model.safetensors"
    code, _, err = cli(capsys, "export", str(tmp_path / "ckpt"), "--format", "safetensors", "-o", str(out))
    assert code == EXIT_OK and err == ""
    code, table, _ = cli(capsys, "inspect", str(out))
    assert code == EXIT_OK
    assert [line.split()[0] for line in table.splitlines()[1:-1]] == sorted(["_MODEL_STRUCTURE", *model.param_names])
    _, bias, _ = cli(capsys, "inspect", str(out), "--tensor", "dense/bias")
    assert bias == "dense/bias (float32, [5]):\n[0., 0., 0., 0., 0.]\n"
    loaded = orchestrator.load_model(str(out))
    x = np.random.default_rng(0).standard_normal((7, 6)).astype(np.float32)
    assert loaded.logits(None, x).tobytes() == model.logits(None, x).tobytes()


def test_export_without_structure_exports_every_tensor_and_says_what_is_missing(tmp_path, capsys):
    import orchestrator
    from orchestrator.engine.loading import ModelLoadError
    safetensors_numpy = pytest.importorskip("safetensors.numpy")

    _saved_model(tmp_path / "ckpt", with_structure=False)
    out = tmp_path / "plain.safetensors"
    code, stdout, err = cli(capsys, "export", str(tmp_path / "ckpt"), "--format", "safetensors", "-o", str(out))
    assert code == EXIT_OK and "(5 tensors" in stdout
    assert err.startswith("note: ") and "no model structure record" in err and "structure=model" in err
    assert sorted(safetensors_numpy.load_file(str(out))) == ["dense/bias", "dense/kernel", "dense/kernel/Adam",
                                                             "dense_1/bias", "dense_1/kernel"]
    with pytest.raises(ModelLoadError, match="no model structure record.*exported from a checkpoint without one"):
        orchestrator.load_model(str(out))


# ---------------------------------------------------------------------------- train (real Ray)
def _train(tmp_path: Path, *sets: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``orchestrator train configs/quickstart.yaml`` into tmp_path.

    RAY_ADDRESS=local: always a fresh in-process Ray, never whatever Ray another test (or
    the session fixture) has running on this machine.
    """
    args = ["train", str(QUICKSTART), "--set", f"run_dir={tmp_path / 'run'}",
            "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", "--set", "logging.progress=plain"]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, cwd=tmp_path, env={"RAY_ADDRESS": "local", **(env or {})}, timeout=300)


def _progress_steps(stdout: str) -> list[int]:
    return [int(m) for m in re.findall(r"^\S+ \S+ step (\d+)/", stdout, flags=re.M)]


def _event_loss_steps(run_dir: Path) -> list[list[int]]:
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    per_file = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        steps = [e.step for e in loader.EventFileLoader(str(path)).Load()
                 if any(v.tag == "loss" for v in e.summary.value)]
        per_file.append(steps)
    return per_file


def _event_tags(run_dir: Path) -> set[str]:
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    return {v.tag for path in (run_dir / "tensorboard").glob("events.out.tfevents.*")
            for e in loader.EventFileLoader(str(path)).Load() for v in e.summary.value}


def _readme_tensorboard_tags() -> set[str]:
    """The tags README.md's run-directory listing names after ``tensorboard/``."""
    text = (REPO / "README.md").read_text()
    listing = text.split("  tensorboard/", 1)[1].split("  config.yaml", 1)[0]
    return {tag.strip() for tag in listing.replace("\n", ",").split(",") if tag.strip()}


SECRET = "orch-test-secret-value-8271"


def test_quickstart_trains_checkpoints_and_resumes(tmp_path):
    env = {"ORCH_TEST_SECRET": SECRET}
    quick = ("checkpoint.save_every_steps=50", "train.eval_every_steps=50")
    first = _train(tmp_path, "train.steps=100", *quick, "checkpoint.storage_options={auto_mkdir: true, "
                   "key: '${ORCH_TEST_SECRET}'}", env=env)
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    assert [i.step for i in list_checkpoints(str(tmp_path / "ckpt"))] == [50, 100], first.stdout + first.stderr
    assert _progress_steps(first.stdout)[0] == 20 and _progress_steps(first.stdout)[-1] == 100
    assert "Run summary: quickstart (completed)" in first.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_completed"] == 100 and summary["last_checkpoint"].endswith("model.ckpt-100")
    assert 0 < summary["final_metrics"]["loss"] < 2.3  # below chance level (ln 10): it learned
    log = (tmp_path / "run" / "train.log").read_text()  # "the log" holds what stdout showed, not only start-up
    for line in ("step 100/100 100% | loss", "eval at step 50: accuracy", "checkpoint at step 100 saved in",
                 "Run summary: quickstart (completed)"):
        assert line in log, line
    assert "checkpoint at step" not in first.stderr  # on stdout and in the log, not a third time on stderr
    dumped = (tmp_path / "run" / "config.yaml").read_text()
    assert "${ORCH_TEST_SECRET}" in dumped
    # the resolved secret is nowhere: not in output, logs, summary, config dump or checkpoints
    assert SECRET not in first.stdout + first.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    second = _train(tmp_path, "train.steps=150", *quick, env=env)
    assert second.returncode == EXIT_OK, second.stderr[-3000:]
    steps = _progress_steps(second.stdout)
    assert steps[0] == 120 and steps[-1] == 150  # resumed after step 100, did not start over
    assert [i.step for i in list_checkpoints(str(tmp_path / "ckpt"))] == [50, 100, 150]
    assert _event_tags(tmp_path / "run") == _readme_tensorboard_tags()  # the README lists every tag, no more
    loss_steps = _event_loss_steps(tmp_path / "run")
    assert len(loss_steps) == 2  # one event file per run, both under <run_dir>/tensorboard
    assert loss_steps[0][0] == 1 and loss_steps[0][-1] == 100
    assert 100 < loss_steps[1][0] and loss_steps[1][-1] == 150
    _check_ls_and_inspect_of_run(tmp_path / "ckpt")


def _check_ls_and_inspect_of_run(ckpt: Path) -> None:
    """``ls`` and ``inspect`` on the checkpoints a real 2-worker run wrote."""
    ls = run_cli("ls", str(ckpt))
    rows = [re.split(r"\s{2,}", r) for r in ls.stdout.splitlines()[1:]]
    assert [(r[0], r[3], r[5]) for r in rows] == [("50", "2", "model.ckpt-50"), ("100", "2", "model.ckpt-100"),
                                                  ("150", "2", "model.ckpt-150")]
    assert all("latest" in r[4] for r in rows)
    inspect = run_cli("inspect", str(ckpt))
    assert inspect.returncode == EXIT_OK, inspect.stderr
    lines = inspect.stdout.splitlines()
    kernel = next(l for l in lines if l.startswith("dense/kernel "))
    assert kernel.split()[1:4] == ["float32", "[64,", "256]"]  # digits: 64 inputs, quickstart hidden 256
    assert {l.split()[-1] for l in lines if l.startswith("dense")} == {"0", "1"}  # spread over both shards
    step = run_cli("inspect", str(ckpt), "--tensor", "global_step")
    assert step.returncode == EXIT_OK and step.stdout == "global_step (int64, []):\n150\n"


def test_preemption_notice_mid_run_exits_3_with_checkpoint(tmp_path):
    """The scheduler's notice file appears while training: emergency checkpoint, exit 3, resumable."""
    notice = tmp_path / "preempt-now"
    args = ["train", str(QUICKSTART), "--set", f"run_dir={tmp_path / 'run'}", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
            "--set", "logging.progress=plain", "--set", "train.steps=5000", "--set", "train.log_every_steps=10",
            "--set", f"fault_tolerance.preemption_notice_file={notice}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until training is under way
            if re.search(r" step \d+/5000", line):
                notice.write_text("maintenance in 30 s")
                break
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    infos = list_checkpoints(str(tmp_path / "ckpt"))
    assert summary["status"] == "preempted" and infos and summary["last_checkpoint"] == infos[-1].prefix
    assert 10 <= infos[-1].step < 5000
    assert "Run summary: quickstart (preempted)" in stdout


def test_failed_run_exits_1_with_one_line_error_and_summary(tmp_path):
    # no step finishes within a microsecond: the first one counts as a worker failure, and none is allowed
    proc = _train(tmp_path, "fault_tolerance.step_timeout_s=0.000001", "fault_tolerance.max_failures=0")
    assert proc.returncode == EXIT_FAILURE
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: job quickstart failed:") and "max_failures=0" in last, last
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps_completed"] == 0
    assert "Traceback" not in proc.stderr  # the console stays brief ...
    assert "Traceback" in (tmp_path / "run" / "train.log").read_text()  # ... the log has the details

"""Job config loading: every malformed config gives ONE located error and exit 2, writing nothing.

The table runs the real CLI in a subprocess (``python -m orchestrator.cli validate``), the
way an operator meets these errors. A line ending in ``#<`` in a case's YAML is the line
the error must point at.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import typing
from pathlib import Path

import pydantic
import pytest
from pydantic import BaseModel
import yaml

from orchestrator.config import (
    ConfigError, Device, JobConfig, OptimizerName, Secret, WorkersConfig, dump_config, load_config,
    parse_options, redact,
)
from orchestrator.errors import OrchestratorError
from orchestrator.exit_codes import EXIT_BAD_INPUT

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: job
run_dir: {tmp}/run
model:
  hidden: [32, 32]
train:
  steps: 50
workers: 2
checkpoint:
  dir: {tmp}/ckpt
  save_every_steps: 10
"""

# (id, yaml text or None for GOOD, overrides, expected message substring)
CASES = [
    ("unknown-top-level", GOOD + "optimiser:  #<\n  name: sgd\n", [], "optimiser: unknown key; did you mean 'optimizer'?"),
    ("unknown-nested", GOOD.replace("  hidden: [32, 32]", "  hiden: [32, 32]  #<"), [],
     "model.hiden: unknown key; did you mean 'hidden'?"),
    ("key-in-wrong-group", GOOD + "steps: 10  #<\n", [], "steps: unknown key; did you mean 'train.steps'?"),
    ("key-in-wrong-nested-group", GOOD + "fault_tolerance:\n  gce: true  #<\n", [],
     "fault_tolerance.gce: unknown key; did you mean 'fault_tolerance.preemption_notices.gce'?"),
    ("int-wrong-type", GOOD.replace("  steps: 50", "  steps: ten  #<"), [],
     "train.steps: expected an integer, got string 'ten'"),
    ("int-given-float", GOOD + "seed: 1.5  #<\n", [], "seed: expected an integer, got number 1.5"),
    ("float-wrong-type", GOOD + "optimizer:\n  learning_rate: fast  #<\n", [],
     "optimizer.learning_rate: expected a number, got string 'fast'"),
    ("bool-wrong-type", GOOD + "  async_save: maybe  #<\n", [],
     "checkpoint.async_save: expected a boolean (true/false), got string 'maybe'"),
    ("string-wrong-type", GOOD.replace("name: job", "name: 123  #<"), [], "name: expected a string, got integer 123"),
    ("enum-unknown", GOOD + "device: tpu  #<\n", [], "device: must be one of cpu, gpu, auto (got 'tpu')"),
    ("enum-typo", GOOD + "optimizer:\n  name: rmsprp  #<\n", [], "did you mean 'rmsprop'?"),
    ("lr-out-of-range", GOOD + "optimizer:\n  learning_rate: -0.1  #<\n", [],
     "optimizer.learning_rate: must be > 0 (got -0.1)"),
    ("keep-prob-out-of-range", GOOD.replace("  hidden: [32, 32]", "  hidden: [32, 32]\n  keep_prob_input: 1.5  #<"), [],
     "model.keep_prob_input: must be in (0, 1] (got 1.5)"),
    ("workers-zero", GOOD.replace("workers: 2", "workers: 0  #<"), [], "workers: must be in [1, 4096] (got 0)"),
    ("workers-min-above-max", GOOD.replace("workers: 2", "workers:\n  min: 4  #<\n  max: 2"), [],
     "workers.min: must be <= workers.max (4 > 2)"),
    ("workers-wrong-type", GOOD.replace("workers: 2", "workers: many  #<"), [],
     "workers: expected an integer or {min: N, max: M}"),
    ("missing-name", GOOD.replace("name: job\n", "#<\n"), [], "name: missing required key"),
    ("missing-checkpoint-dir", GOOD.replace("checkpoint:", "checkpoint:  #<").replace("  dir: {tmp}/ckpt\n", ""), [],
     "checkpoint.dir: missing required key"),
    ("missing-checkpoint-group", "#<\n" + GOOD.split("checkpoint:")[0], [], "checkpoint: missing required key"),
    ("hidden-negative", GOOD.replace("  hidden: [32, 32]", "  hidden: [32, -1]  #<"), [],
     "model.hidden[1]: must be in [1, 65536] (got -1)"),
    ("hidden-not-a-list", GOOD.replace("  hidden: [32, 32]", "  hidden: 64  #<"), [],
     "model.hidden: expected a list, got integer 64"),
    ("group-not-a-mapping", GOOD + "optimizer: adam  #<\n", [], "optimizer: expected a mapping of keys, got string 'adam'"),
    ("env-var-unset", GOOD + "  storage_options:\n    key: ${ORCH_TEST_UNSET_VAR}  #<\n", [],
     "checkpoint.storage_options.key: environment variable ORCH_TEST_UNSET_VAR is not set"),
    ("env-ref-malformed", GOOD + "  storage_options:\n    key: ${ORCH_TEST_VAR  #<\n", [], "malformed reference"),
    ("checkpointing-off", GOOD.replace("  save_every_steps: 10", "  save_every_steps: 0  #<"), [],
     "checkpoint.save_every_steps: checkpointing is off"),
    ("keep-best-without-metric", GOOD + "  keep_best: 2  #<\n", [], "checkpoint.keep_best: needs best_metric"),
    ("sequential-without-layers", GOOD.replace("  hidden: [32, 32]", "  kind: sequential  #<"), [],
     "model.layers: kind sequential needs layers"),
    ("transformer-layers-as-list", GOOD.replace("  hidden: [32, 32]", "  kind: transformer\n  layers: [2]  #<"), [],
     "model.layers: kind transformer takes the number of blocks (an integer), got list [2]"),
    ("key-of-another-kind", GOOD.replace("  hidden: [32, 32]", "  hidden: [32, 32]\n  heads: 8  #<"), [],
     "model.heads: applies to kind transformer only (kind is mlp)"),
    ("mnist-without-path", GOOD + "data:\n  dataset: mnist  #<\n", [], "data.path: dataset mnist needs data.path"),
    ("max-failures-below-minus-one", GOOD + "fault_tolerance:\n  max_failures: -2  #<\n", [],
     "fault_tolerance.max_failures: must be >= -1 (got -2)"),
    ("step-timeout-zero", GOOD + "fault_tolerance:\n  step_timeout_s: 0  #<\n", [],
     "fault_tolerance.step_timeout_s: must be > 0 (got 0)"),
    ("null-for-required-type", GOOD + "seed: null  #<\n", [], "seed: must not be null (expected an integer)"),
    ("duplicate-key", GOOD + "seed: 1\nseed: 2  #<\n", [], "seed: duplicate key"),
    ("yaml-syntax-error", GOOD.replace("  hidden: [32, 32]", "  hidden: [32, 32]]  #<"), [], "invalid YAML"),
    ("top-level-not-mapping", "- name: job  #<\n", [], "the top level must be a mapping"),
    ("path-of-a-bundled-dataset", GOOD + "data:\n  path: train.npz  #<\n", [],
     "data.path: dataset digits reads no file; to train on your files, set data.format"),
    ("files-key-without-format", GOOD + "data:\n  dataset: synthetic\n  labels: y  #<\n", [],
     "data.labels: applies to data.format (your files) only"),
    ("key-not-a-string", GOOD + "1: 2  #<\n", [], "job.yaml:11: a key must be a string, got integer 1 (quote it: '1')"),
    ("nested-key-not-a-string", GOOD + "optimizer:\n  args:\n    yes: 3  #<\n", [],
     "optimizer.args: a key must be a string, got boolean True (quote it: 'yes')"),
    ("set-wrong-type", None, ["train.steps=abc"], "--set train.steps=abc: train.steps: expected an integer"),
    ("set-unknown-key", None, ["model.hidden_units=[4]"], "--set model.hidden_units=[4]: model.hidden_units: unknown key"),
    ("set-out-of-range", None, ["checkpoint.max_to_keep=-1"], "--set checkpoint.max_to_keep=-1: checkpoint.max_to_keep: must be >= 0"),
    ("set-without-equals", None, ["train.steps"], "--set train.steps: expected KEY=VALUE"),
    ("init-from-without-checkpoint", GOOD + "init_from:  #<\n  variables: ['dense/*']\n", [],
     "init_from.checkpoint: missing required key"),
    ("init-from-no-variables", GOOD + "init_from:\n  checkpoint: /old/ckpt\n  variables: []  #<\n", [],
     "init_from.variables: must have at least 1 item(s) (got 0)"),
    ("init-from-rename-not-a-name", GOOD + "init_from:\n  checkpoint: /old/ckpt\n  rename: {a: 3}  #<\n", [],
     "init_from.rename.a: expected a string, got integer 3"),
    ("init-from-with-resume-path", GOOD + "resume: /old/ckpt\ninit_from:  #<\n  checkpoint: /old/ckpt\n", [],
     "init_from: resume: <checkpoint> continues that run"),
]


def _write_case(tmp_path: Path, text: str | None) -> tuple[Path, int | None]:
    text = (text or GOOD).replace("{tmp}", str(tmp_path))
    path = tmp_path / "job.yaml"
    path.write_text(text)
    marked = [i + 1 for i, line in enumerate(text.splitlines()) if line.rstrip().endswith("#<")]
    return path, (marked[0] if marked else None)


def _run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_good_config_validates(tmp_path):
    path, _ = _write_case(tmp_path, None)
    proc = _run_cli("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: job: mlp 32-32 on digits, 2 worker(s), 50 steps")
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()


def _validate_in_process(capsys, monkeypatch, cwd: Path, *args: str) -> tuple[int, str, str]:
    """``orchestrator validate`` through ``cli.main`` in this process: the same code as the
    subprocess runs (test_good_config_validates and the train cases below run that), without
    half a second of interpreter start-up per case of the table."""
    from orchestrator.cli import main

    monkeypatch.chdir(cwd)
    code = main(["validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case_id, text, overrides, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_config_gives_one_located_error(tmp_path, capsys, monkeypatch, case_id, text, overrides, expected):
    path, line = _write_case(tmp_path, text)
    sets = [a for o in overrides for a in ("--set", o)]
    code, out, err = _validate_in_process(capsys, monkeypatch, tmp_path, str(path), *sets)
    assert code == EXIT_BAD_INPUT
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0]
    where = f"{path}:{line}:" if line else ("--set " if overrides else str(path))
    assert lines[0].startswith(f"error: {where}"), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.mark.parametrize("case_id", ["unknown-nested", "lr-out-of-range", "env-var-unset", "set-wrong-type"])
def test_train_with_bad_config_starts_and_writes_nothing(tmp_path, case_id):
    _, text, overrides, expected = next(c for c in CASES if c[0] == case_id)
    path, _ = _write_case(tmp_path, text)
    sets = [a for o in overrides for a in ("--set", o)]
    proc = _run_cli("train", str(path), *sets, cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert expected in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_missing_config_file_is_bad_input(tmp_path):
    proc = _run_cli("validate", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert "nope.yaml: config file not found" in proc.stderr


# ---------------------------------------------------------------------------- in-process behaviour
def _load(tmp_path, text=None, overrides=(), environ=None):
    path, _ = _write_case(tmp_path, text)
    return load_config(path, list(overrides), environ=environ or {})


def test_defaults_and_normalisation(tmp_path):
    cfg = _load(tmp_path, GOOD.replace("run_dir: {tmp}/run\n", "").replace("workers: 2\n", ""))
    assert cfg.run_dir == os.path.join("runs", "job")
    assert cfg.workers == WorkersConfig(min=2, max=2)
    assert cfg.optimizer.name is OptimizerName.RMSPROP and cfg.optimizer.learning_rate == 0.001
    assert cfg.resources.gpus_per_worker is None  # 1 on gpu, else 0: cluster.scaling_policy.worker_shape
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train.steps = 3  # type: ignore[misc]


def test_workers_forms(tmp_path):
    assert _load(tmp_path, GOOD.replace("workers: 2", "workers: {min: 1, max: 4}")).workers == WorkersConfig(min=1, max=4)
    assert _load(tmp_path, overrides=["workers.max=4"]).workers == WorkersConfig(min=2, max=4)
    assert _load(tmp_path, overrides=["workers={min: 2, max: 3}"]).workers == WorkersConfig(min=2, max=3)


def test_overrides_follow_yaml_scalar_rules(tmp_path):
    cfg = _load(tmp_path, overrides=["train.steps=500", "model.hidden=[8, 16]", "checkpoint.async_save=false",
                                     "checkpoint.save_every_secs=2.5", "device=auto", "cluster.address=auto"])
    assert cfg.train.steps == 500 and cfg.model.hidden == [8, 16]
    assert cfg.checkpoint.async_save is False and cfg.checkpoint.save_every_secs == 2.5
    assert cfg.device is Device.AUTO and cfg.cluster.address == "auto"


def test_error_carries_file_line_and_key(tmp_path):
    text = GOOD.replace("  steps: 50", "  steps: -5  #<")
    path, line = _write_case(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, [], environ={})
    assert (info.value.file, info.value.line, info.value.key) == (str(path), line, "train.steps")
    assert isinstance(info.value, ValueError) and isinstance(info.value, OrchestratorError)
    assert pickle.loads(pickle.dumps(info.value)).line == line


SECRET_YAML = GOOD + """\
  storage_options:
    key: ${ORCH_KEY}
    secret: ${oc.env:ORCH_SECRET}
    token: ${oc.env:ORCH_TOKEN,fallback-token-value}
    client_kwargs:
      endpoint_url: http://${ORCH_HOST}:9000
seed: ${ORCH_SEED}
"""

SECRET_ENV = {"ORCH_KEY": "AKIA-very-secret-key", "ORCH_SECRET": "s3cr3t-value-xyz", "ORCH_HOST": "minio.internal",
              "ORCH_SEED": "7"}


def test_env_references_resolve_and_stay_secret(tmp_path):
    cfg = _load(tmp_path, SECRET_YAML, environ=SECRET_ENV)
    opts = cfg.checkpoint.storage_options
    assert opts["key"] == "AKIA-very-secret-key" and isinstance(opts["key"], Secret)
    assert opts["secret"] == "s3cr3t-value-xyz"
    assert opts["token"] == "fallback-token-value"
    assert opts["client_kwargs"]["endpoint_url"] == "http://minio.internal:9000"
    assert cfg.seed == 7
    shown = repr(cfg) + str(cfg) + dump_config(cfg)
    for value in ("AKIA-very-secret-key", "s3cr3t-value-xyz", "minio.internal"):
        assert value not in shown
    assert "${ORCH_KEY}" in dump_config(cfg) and "${oc.env:ORCH_SECRET}" in repr(cfg)
    assert redact("auth with AKIA-very-secret-key ok") == "auth with *** ok"
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_short_env_values_in_storage_options_do_not_garble_logs(tmp_path):
    text = SECRET_YAML.replace("    key: ${ORCH_KEY}\n", "    key: ${ORCH_KEY}\n    use_ssl: ${ORCH_SSL}\n")
    cfg = _load(tmp_path, text, environ=dict(SECRET_ENV, ORCH_SSL="1"))
    assert cfg.checkpoint.storage_options["use_ssl"] == "1"
    assert "<secret ${ORCH_SSL}>" in repr(cfg)  # still never shown as a value
    assert redact("step 1 of 10 with AKIA-very-secret-key") == "step 1 of 10 with ***"


def test_dump_round_trips_through_load(tmp_path):
    cfg = _load(tmp_path, SECRET_YAML, environ=SECRET_ENV)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped, [], environ=SECRET_ENV) == cfg
    assert yaml.safe_load(dumped.read_text())["checkpoint"]["storage_options"]["key"] == "${ORCH_KEY}"


def test_parse_options_nests_dotted_keys(monkeypatch):
    monkeypatch.setenv("ORCH_OPT_KEY", "opt-secret-1234")
    opts = parse_options(["client_kwargs.endpoint_url=http://127.0.0.1:9", "anon=true", "key=${ORCH_OPT_KEY}"])
    assert opts == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "anon": True, "key": "opt-secret-1234"}
    assert "opt-secret-1234" not in repr(opts)
    with pytest.raises(ConfigError, match="--storage-option bad: expected KEY=VALUE"):
        parse_options(["bad"])


def test_shipped_configs_validate(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-shipped-config-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shipped-config-secret")
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"quickstart.yaml", "mnist_mlp.yaml", "s3_checkpoints.yaml", "gpu.yaml",
                                        "cluster.yaml"}
    for path in configs:
        overrides = ["data.path=/data/mnist"] if path.name == "mnist_mlp.yaml" else []
        cfg = load_config(path, overrides)
        assert isinstance(cfg, JobConfig) and cfg.name


def _gen_config_doc():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_config_doc", REPO / "scripts" / "gen_config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_doc_is_generated_from_the_schema():
    gen = _gen_config_doc()
    assert (REPO / "docs" / "config.md").read_text() == gen.render(), \
        "docs/config.md is stale: run python scripts/gen_config_doc.py"


def test_config_doc_lists_every_schema_key():
    text = (REPO / "docs" / "config.md").read_text()

    def leaves(model, prefix):
        for name, info in model.model_fields.items():
            tp = info.annotation
            optional = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = optional[0] if len(optional) == 1 else tp  # an optional group (init_from) lists its keys
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                yield from leaves(tp, f"{prefix}{name}.")
            else:
                yield prefix + name

    keys = list(leaves(JobConfig, ""))
    assert "fault_tolerance.preemption_notices.gce" in keys  # nested groups are walked too
    for key in keys:
        assert f"| `{key}` |" in text, key


def test_env_values_outside_storage_options_are_plain_but_dump_as_references(tmp_path):
    text = GOOD.replace("name: job", "name: job\ndata:\n  dataset: mnist\n  path: ${oc.env:ORCH_DATA,/data/mnist}")
    cfg = _load(tmp_path, text, environ={"ORCH_DATA": "/mnt/datasets/mnist-idx"})
    assert cfg.data.path == "/mnt/datasets/mnist-idx" and not isinstance(cfg.data.path, Secret)
    assert "/mnt/datasets/mnist-idx" in repr(cfg)  # a path is not a credential: logs may show it
    assert redact("reading /mnt/datasets/mnist-idx") == "reading /mnt/datasets/mnist-idx"
    assert yaml.safe_load(dump_config(cfg))["data"]["path"] == "${oc.env:ORCH_DATA,/data/mnist}"
    assert _load(tmp_path, text).data.path == "/data/mnist"  # the default when unset


# ---------------------------------------------------------------------------- the JSON Schema
def _schema_validator():
    import json

    import jsonschema

    schema = json.loads((REPO / "docs" / "job.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_published_schema_is_current_and_printed_by_the_cli(tmp_path):
    from orchestrator.config import schema_text

    assert (REPO / "docs" / "job.schema.json").read_text() == schema_text(), \
        "docs/job.schema.json is stale: run python scripts/gen_config_doc.py"
    proc = _run_cli("schema", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == schema_text()


def test_schema_accepts_every_shipped_config():
    validator = _schema_validator()
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert REPO / "configs" / "plugins" / "factorization.yaml" in paths  # every file, subdirectories too
    for path in paths:
        text = path.read_text()
        hint = re.match(r"# yaml-language-server: \$schema=(\S+)\n", text)
        assert hint and (path.parent / hint.group(1)).resolve() == REPO / "docs" / "job.schema.json", path.name
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(text))]
        assert not errors, f"{path.name}: {errors}"


# Corpus cases a JSON Schema cannot judge, and why; every other case must be rejected by it.
SCHEMA_BLIND = {
    "duplicate-key": "YAML loaders keep the last value; the located loader rejects it",
    "yaml-syntax-error": "not YAML: nothing to validate",
    "env-var-unset": "depends on the environment",
    "env-ref-malformed": "inside storage_options, any fsspec option is allowed",
    "workers-min-above-max": "JSON Schema cannot compare two values",
    "set-without-equals": "a command-line syntax error",
    "key-of-another-kind": "a key left at its default is fine with any kind; JSON Schema cannot compare to defaults",
    "init-from-with-resume-path": "JSON Schema cannot compare two values",
    "path-of-a-bundled-dataset": "a key left at its default is fine with any dataset; kept simple for editors",
    "files-key-without-format": "a key left at its default is fine with any dataset; kept simple for editors",
    "nested-key-not-a-string": "JSON keys are strings: a free mapping (args) takes any; the located loader rejects it",
}


def _document(text: str | None, overrides: list[str]) -> dict:
    """What an editor sees: the YAML document with the case's ``--set`` values merged in."""
    doc = yaml.safe_load((text or GOOD).replace("{tmp}", "/tmp/x")) or {}
    for arg in overrides:
        key, _, value = arg.partition("=")
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return doc


@pytest.mark.parametrize("case_id, text, overrides, expected", CASES, ids=[c[0] for c in CASES])
def test_schema_rejects_the_malformed_config_corpus(case_id, text, overrides, expected):
    if case_id in SCHEMA_BLIND:
        pytest.skip(SCHEMA_BLIND[case_id])
    errors = list(_schema_validator().iter_errors(_document(text, overrides)))
    assert errors, f"the schema accepts {case_id}"


def test_schema_accepts_the_good_config_and_env_references():
    validator = _schema_validator()
    assert not list(validator.iter_errors(_document(None, [])))
    assert not list(validator.iter_errors(_document(SECRET_YAML, [])))  # seed: ${ORCH_SEED}


def _string_keys(group=JobConfig, prefix=""):
    """Dotted keys whose value is a string (or null)."""
    for name, info in group.model_fields.items():
        tp = info.annotation
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
        tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from _string_keys(tp, f"{prefix}{name}.")
        elif tp is str:
            yield prefix + name


# A value each string key's own rule accepts; keys not listed take any text. A key added with a new rule
# fails the test below with that rule's message until it gets a value here.
_VALID_STRING = {"model.factory": "my_models:build", "data.factory": "my_data:build",
                 "optimizer.factory": "my_opt:build"}


_FILES_KEYS = {"data.path", "data.features", "data.labels", "data.eval_path"}


def test_every_string_key_keeps_its_env_reference(tmp_path):
    """A string key must be ``Text``: a plain ``str`` would lose its ``${VAR}`` in dump_config."""
    path, _ = _write_case(tmp_path, None)
    keys = list(_string_keys())
    assert {"name", "checkpoint.dir", "data.path", "fault_tolerance.preemption_notices.gce_endpoint",
            *_VALID_STRING} <= set(keys)
    for key in keys:
        value = _VALID_STRING.get(key, "x1")
        files = ["data.format=npz", "data.path=/data/x.npz"] if key in _FILES_KEYS else []  # read by data.format only
        config = load_config(path, [*files, f"{key}=${{ORCH_T}}"], environ={"ORCH_T": value})
        loaded, dumped = config, yaml.safe_load(dump_config(config))
        for part in key.split("."):
            loaded, dumped = getattr(loaded, part), dumped[part]
        assert str(loaded).endswith(value), key      # expanded for the run (paths are made absolute)
        assert dumped == "${ORCH_T}", key            # the reference kept in what is dumped


# ---------------------------------------------------------------------------- bounded input
def _laughs(levels: int = 9) -> str:
    """The "billion laughs": each level an anchor of nine aliases to the one before (9^9 strings).

    Expanding l4 passes 10000 values (9 + 81 + 729 + 6561 + 59049): the error points there.
    """
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" + ("  #<" if i == 4 else ""))
    return "\n".join(lines) + "\n"


def _deep_block(levels: int) -> str:
    """Mappings nested ``levels`` deep; k31's value is the 33rd level (the top mapping is the 1st)."""
    keys = "".join("  " * (i + 1) + f"k{i}:" + ("  #<" if i == 31 else "") + "\n" for i in range(levels))
    return "data:\n" + keys + "  " * (levels + 1) + "v: 1\n"


# (id, yaml text, overrides, expected message); the error's line is the one marked ``#<``.
BOUNDED = [
    ("billion-laughs", GOOD + _laughs(), [], "l4: more than 10000 values"),
    ("alias-inside-its-anchor", GOOD + "loop: &loop [*loop]  #<\n", [], "nested deeper than 32 levels"),
    ("deep-flow-nesting", GOOD + "deep: " + "[" * 20000 + "]" * 20000 + "  #<\n", [], "nested deeper than 32 levels"),
    ("deep-block-nesting", GOOD + _deep_block(100), [], "nested deeper than 32 levels"),
    ("learning-rate-inf", GOOD + "optimizer:\n  learning_rate: .inf  #<\n", [],
     "optimizer.learning_rate: must be a finite number (got inf)"),
    ("learning-rate-nan", GOOD + "optimizer:\n  learning_rate: .nan  #<\n", [], "must be a finite number (got nan)"),
    ("absurd-steps", GOOD.replace("  steps: 50", "  steps: 1000000000000  #<"), [],
     "train.steps: must be in [1, 1000000000] (got 1000000000000)"),
    ("absurd-width", GOOD.replace("  hidden: [32, 32]", "  hidden: [32, 10000000]  #<"), [],
     "model.hidden[1]: must be in [1, 65536]"),
    ("absurd-synthetic-data", GOOD + "data:\n  dataset: synthetic\n  num_examples: 10000000  #<\n  input_dim: 4096\n",
     [], "data.num_examples: 10000000 examples x 4096 features"),
    ("batch-larger-than-digits", GOOD + "data:\n  global_batch_size: 5000  #<\n", [],
     "data.global_batch_size: must be <= the 1438 training examples of the dataset (got 5000)"),
    ("batch-larger-than-synthetic", GOOD + "data:\n  dataset: synthetic\n  num_examples: 100\n"
     "  global_batch_size: 128  #<\n", [], "must be <= the 100 training examples"),
]

# Runs the CLI and reports its peak memory: RUSAGE_CHILDREN of this wrapper covers only that child.
_MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], timeout=50).returncode; "
             "print(f'maxrss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); sys.exit(code)")


@pytest.mark.parametrize("case_id, text, overrides, expected", BOUNDED, ids=[c[0] for c in BOUNDED])
def test_bounded_input_fails_fast_located_and_in_bounded_memory(tmp_path, case_id, text, overrides, expected):
    path, line = _write_case(tmp_path, text)
    assert path.stat().st_size < 50_000 or case_id.startswith("deep")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-m", "orchestrator.cli",
                           "validate", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {path}:{line}:"), lines[0]
    assert int(proc.stdout.split("maxrss_kib=")[1]) < 400 * 1024  # the config never grows to its expansion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_config_file_over_1_mib_is_refused_naming_the_file(tmp_path):
    path, _ = _write_case(tmp_path, GOOD + "# padding to look like a config that is mostly comment\n" * 25_000)
    assert path.stat().st_size > 1 << 20
    proc = _run_cli("validate", str(path), cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr == f"error: {path}: config file is larger than 1 MiB: not a job config\n"


def _fake_mnist(directory: Path, train: int) -> None:
    """The four IDX files of an MNIST-shaped dataset with ``train`` training examples."""
    import struct

    import numpy as np

    directory.mkdir()
    shapes = {"train-images-idx3-ubyte": (train, 28, 28), "train-labels-idx1-ubyte": (train,),
              "t10k-images-idx3-ubyte": (4, 28, 28), "t10k-labels-idx1-ubyte": (4,)}
    for name, shape in shapes.items():
        header = struct.pack(">BBBB", 0, 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
        (directory / name).write_bytes(header + np.zeros(shape, np.uint8).tobytes())


@pytest.mark.parametrize("case", ["batch-larger-than-mnist", "mnist-files-missing"])
def test_train_checks_the_data_before_ray_starts(tmp_path, case):
    """mnist's size is known only from its files: `train` counts them before Ray starts (exit 2, nothing written)."""
    data = tmp_path / "mnist"
    _fake_mnist(data, train=6)
    if case == "mnist-files-missing":
        (data / "t10k-images-idx3-ubyte").unlink()
    path, _ = _write_case(tmp_path, GOOD + f"data:\n  dataset: mnist\n  path: {data}\n  global_batch_size: 4\n")
    sets = ["--set", "data.global_batch_size=128"] if case == "batch-larger-than-mnist" else []
    assert _run_cli("validate", str(path), *sets, cwd=tmp_path).returncode == 0  # validate reads no data
    proc = _run_cli("train", str(path), *sets, cwd=tmp_path, env={"RAY_ADDRESS": "local"})
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    expected = ("data.global_batch_size: must be <= the 6 training examples of the dataset (got 128)"
                if case == "batch-larger-than-mnist" else "data.path: mnist: neither t10k-images-idx3-ubyte")
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and expected in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {path}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "mnist"]  # no run dir, no checkpoint dir

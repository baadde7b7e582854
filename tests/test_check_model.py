"""``orchestrator check-model``: catches broken plug-ins by name, passes the built-in models and the example."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from tests.plugin_fixtures import data_yaml, write_data, write_job, write_plugin

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def plugin_config(tmp_path, monkeypatch):
    """factory name -> a job config training that factory of the test plug-in."""
    module = write_plugin(tmp_path)
    train, evaluation = write_data(str(tmp_path / "data"), "npz")
    monkeypatch.chdir(tmp_path)

    def write(factory: str) -> Path:
        return write_job(tmp_path, module, data_yaml("npz", train, evaluation), factory=factory)

    return write


def check(capsys, config: Path, *args: str) -> tuple[int, list[str], str]:
    code = main(["check-model", str(config), *args])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err.strip()


def failed(lines: list[str]) -> list[str]:
    return [line.split(":")[0].removeprefix("FAIL").strip() for line in lines if line.startswith("FAIL")]


def test_a_correct_plugin_passes_every_check(plugin_config, capsys):
    code, lines, err = check(capsys, plugin_config("build"))
    assert code == EXIT_OK, err
    assert failed(lines) == []
    names = [line.split(":")[0].removeprefix("ok").strip() for line in lines if line.startswith("ok")]
    assert names == ["grads", "determinism", "split batch", "gradient linear/weights", "gradient linear/bias",
                     "evaluate"]
    assert lines[-1] == "OK: 6 checks passed"


@pytest.mark.parametrize("factory, failures, words", [
    ("build_wrong_gradient", ["gradient linear/bias"], "finite difference (float64)"),
    ("build_wrong_name", ["grads", "gradient linear/bias"], "gradient(s) ['linear/biases'] name no variable"),
    ("build_batch_dependent", ["split batch"], "divide by global_batch_size"),
    ("build_stateful_rng", ["determinism", "split batch", "gradient linear/weights", "gradient linear/bias"],
     "draw randomness from (seed, step, example index)"),
])
def test_broken_plugins_are_caught_by_name(plugin_config, capsys, factory, failures, words):
    code, lines, err = check(capsys, plugin_config(factory))
    assert code == EXIT_BAD_INPUT
    assert failed(lines)[:len(failures)] == failures
    assert words in "\n".join(lines)
    assert err.startswith("error: check-model:") and failures[0] in err


@pytest.mark.parametrize("config, sets", [
    ("configs/quickstart.yaml", []),
    ("configs/quickstart.yaml", ["model.kind=softmax"]),
    ("configs/quickstart.yaml", ["model.activation=gelu"]),
    ("configs/plugins/factorization.yaml", []),
])
def test_built_in_models_and_the_example_plugin_pass(capsys, monkeypatch, config, sets):
    monkeypatch.chdir(REPO)
    code, lines, err = check(capsys, REPO / config, *[a for s in sets for a in ("--set", s)])
    assert code == EXIT_OK, "\n".join(lines) + err
    assert not failed(lines) and lines[-1].startswith("OK:")


def test_the_worked_example_in_docs_plugins_md_passes(tmp_path, monkeypatch, capsys):
    """docs/plugins.md's complete example, as written, on generated npz data."""
    import re

    import numpy as np

    from tests.plugin_fixtures import encode, make_arrays

    text = (REPO / "docs" / "plugins.md").read_text().split("### A complete example", 1)[1]
    source = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    job = re.search(r"```yaml\n(.*?)```", text, flags=re.S).group(1)
    (tmp_path / "linear.py").write_text(source)
    (tmp_path / "data").mkdir()
    x, y = make_arrays(200)
    (tmp_path / "data" / "train.npz").write_bytes(encode("npz", x, y))
    (tmp_path / "job.yaml").write_text(job)
    monkeypatch.chdir(tmp_path)
    code, lines, err = check(capsys, tmp_path / "job.yaml")
    assert code == EXIT_OK, "\n".join(lines) + err
    assert np.isfinite(float(lines[-2].split("mean loss ")[1].split(",")[0]))


@pytest.mark.parametrize("examples", ["-3", "0", "1"])
def test_examples_below_two_is_named_as_the_option_at_fault(plugin_config, capsys, examples):
    """--examples -3 was reported as 'the data has -3': the option, not the data, is wrong."""
    code, lines, err = check(capsys, plugin_config("build"), "--examples", examples)
    assert code == EXIT_BAD_INPUT and lines == []
    assert err == f"error: --examples {examples}: check-model needs at least 2 examples", err

"""Every snippet of docs/python-api.md runs: TensorFlow's in order in one TF1 graph-mode process,
ours (Python) in order in one namespace, the shell ones as written, all in a scratch directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "python-api.md"


def _blocks(kind: str) -> list[str]:
    return [code for info, code in re.findall(r"```([a-z ]+)\n(.*?)```", DOC.read_text(), flags=re.S)
            if info.strip() == kind]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_the_doc_covers_every_saver_idiom_on_both_sides():
    headings = re.findall(r"^## (.+)$", DOC.read_text(), flags=re.M)
    for idiom in ("global_step", "var_list", "Swap", "warm start", "max_to_keep", "keep_checkpoint_every_n_hours",
                  "latest_checkpoint", "get_checkpoint_state", "Inspect", "import_meta_graph", "load_model",
                  "export", "No `var_list`"):
        assert any(idiom in h for h in headings), idiom
    assert len(_blocks("python tensorflow")) >= 10 and len(_blocks("python")) >= 11 and _blocks("bash")


def test_our_snippets_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "python_api_doc"}
    for i, code in enumerate(_blocks("python")):
        exec(compile(code, f"{DOC.name}[python {i}]", "exec"), namespace)  # noqa: S102 - our own doc
    for code in _blocks("bash"):  # the CLI on what the snippets wrote
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, code + proc.stdout + proc.stderr
    assert (tmp_path / "exported" / "model.ckpt-1.safetensors").is_file()


def test_tensorflow_snippets_run_in_order(tmp_path):
    pytest.importorskip("tensorflow")
    script = "\n".join(_blocks("python tensorflow"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "tf" / "frozen.pb").is_file()

"""scripts/bench_engine.py runs end to end (tiny sizes) and reports both sides and their ratio."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_engine.py"


def test_bench_prints_throughputs_and_ratio(capsys, monkeypatch):
    pytest.importorskip("torch", reason="torch is the benchmark-only 'bench' extra")
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--steps", "2", "--rounds", "1", "--warmup", "1",
                                      "--threads", "1", "--examples", "300"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    engine = float(re.search(r"engine \(numpy\):\s+([\d.]+) steps/s", out).group(1))
    torch_rate = float(re.search(r"torch  \(cpu\):\s+([\d.]+) steps/s", out).group(1))
    ratio = float(re.search(r"ratio engine / torch: ([\d.]+)x", out).group(1))
    assert engine > 0 and torch_rate > 0
    assert ratio == pytest.approx(engine / torch_rate, rel=0.02, abs=0.01)
    assert "threads: 1" in out


def test_bench_gpu_without_gpu_fails_with_a_clear_message(monkeypatch):
    from orchestrator.engine.backend import BackendUnavailableError, cupy_backend

    try:
        cupy_backend()
        pytest.skip("a CUDA GPU is usable here; the failure path cannot be observed")
    except BackendUnavailableError:
        pass
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--device", "gpu"])
    with pytest.raises(SystemExit, match="--device gpu"):
        runpy.run_path(str(SCRIPT), run_name="__main__")

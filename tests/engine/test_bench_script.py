"""scripts/bench_engine.py runs end to end (tiny sizes) and reports both sides and their ratio."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_engine.py"


def _run(monkeypatch, capsys, *extra):
    pytest.importorskip("torch", reason="torch is the benchmark-only 'bench' extra")
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--steps", "2", "--rounds", "1", "--warmup", "1",
                                      "--threads", "1", "--examples", "300", "--settle", "0.01", *extra])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return capsys.readouterr().out


def test_bench_prints_throughputs_and_ratio_of_every_workload(capsys, monkeypatch):
    out = _run(monkeypatch, capsys, "--no-memory")
    engine = [float(v) for v in re.findall(r"engine \(numpy\):\s+([\d.]+) steps/s", out)]
    torch_rate = [float(v) for v in re.findall(r"torch  \(cpu\):\s+([\d.]+) steps/s", out)]
    ratio = [float(v) for v in re.findall(r"ratio engine / torch: ([\d.]+)x", out)]
    assert re.findall(r"^\[(\w+)\]", out, re.M) == ["mlp", "cnn", "transformer"]
    assert len(engine) == len(torch_rate) == len(ratio) == 3
    for mine, theirs, quotient in zip(engine, torch_rate, ratio):
        assert mine > 0 and theirs > 0
        assert quotient == pytest.approx(mine / theirs, rel=0.02, abs=0.01)
    assert "threads: 1" in out and "peak memory" not in out


def test_bench_reports_peak_memory_of_both_sides(capsys, monkeypatch):
    out = _run(monkeypatch, capsys, "--workloads", "cnn")
    found = re.search(r"peak memory growth: engine ([\d.]+) MiB, torch ([\d.]+) MiB", out)
    assert found, out
    assert float(found.group(1)) > 0 and float(found.group(2)) > 0


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

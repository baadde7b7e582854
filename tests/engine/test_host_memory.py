"""Freed host memory stays in a training process (engine/host_memory.py): no page faults per step."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

CHURN = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from orchestrator.engine.host_memory import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "retain" else None

    def step():                                  # a step's worth of activations: 8 x 4 MiB, written, freed
        arrays = [np.ones(1 << 20, np.float32) for _ in range(8)]
        return sum(float(a[0]) for a in arrays)

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _child(code: str, *args: str, env: dict | None = None) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    environment.update(env or {}, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_freed_step_memory_is_not_faulted_in_again_at_the_next_step():
    _, default_faults = _child(CHURN, "default")
    applied, retained_faults = _child(CHURN, "retain")
    if float(default_faults) < 1024:
        pytest.skip(f"this glibc keeps the pattern's memory by itself ({default_faults} faults a step)")
    assert applied == "True"
    assert float(retained_faults) <= 0.05 * float(default_faults), (default_faults, retained_faults)


def test_malloc_settings_chosen_in_the_environment_are_left_alone():
    code = "from orchestrator.engine.host_memory import retain_freed_memory; print(retain_freed_memory())"
    assert _child(code, env={"MALLOC_TRIM_THRESHOLD_": "1048576"}) == ["False"]
    assert _child(code, env={"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}) == ["False"]
    assert _child(code) == ["True"]


def test_a_training_step_on_numpy_retains_its_memory():
    code = textwrap.dedent("""
        import resource
        from orchestrator.engine import host_memory
        from orchestrator.engine.backend import get_backend
        from orchestrator.engine.data import Sampler, load_chars
        from orchestrator.engine.models import build_model
        from orchestrator.engine.optimizers import make_optimizer
        from orchestrator.engine.step import Trainer
        from orchestrator.engine.transformer import TransformerSpec

        data = load_chars(context=64)
        spec = TransformerSpec(vocab=data.num_classes, context=64, d_model=64, heads=4, layers=2, dropout=0.1)
        trainer = Trainer(build_model(spec, get_backend("cpu"), seed=0), make_optimizer("adam", learning_rate=3e-3),
                          Sampler(len(data.train_y), 32, seed=0), data, seed=0)
        for _ in range(3):
            trainer.train_step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            trainer.train_step()
        print(host_memory._applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    """)
    applied, faults = _child(code)
    assert applied == "True"
    assert float(faults) < 256, f"{faults} page faults a step: the step's memory went back to the OS"

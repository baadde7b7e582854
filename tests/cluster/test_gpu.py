"""GPU paths: cupy workers and the NCCL collective (skipped, visibly, without CUDA GPUs)."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import make_config, with_changes, worker_state

def gpu_count() -> tuple[int, str]:
    """(number of CUDA GPUs, why none) without starting anything."""
    try:
        import cupy
    except ImportError as exc:
        return 0, f"no CUDA GPU / cupy not installed: {exc}"
    try:
        return int(cupy.cuda.runtime.getDeviceCount()), "no CUDA GPU visible"
    except Exception as exc:  # cupy present but no driver/device
        return 0, f"no CUDA GPU: {exc}"


GPUS, WHY_NOT = gpu_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 1, reason=WHY_NOT)]


def cpu_reference(tmp_path, run_coordinator, config):
    coordinator = run_coordinator(with_changes(config, device="cpu", checkpoint={"dir": str(tmp_path / "cpu")}))
    coordinator.run()
    return worker_state(coordinator)


def test_one_gpu_worker_matches_cpu(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "gpu"), workers=1, steps=8, save_every=4, hidden=(32,))
    expected = cpu_reference(tmp_path, run_coordinator, config)
    coordinator = run_coordinator(with_changes(config, device="gpu"))
    coordinator.run()
    actual = worker_state(coordinator)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.skipif(GPUS < 2, reason=f"NCCL needs >= 2 CUDA GPUs, one per rank ({GPUS} here: {WHY_NOT})")
def test_nccl_exchange_matches_the_cpu_exchange(tmp_path, run_coordinator):
    config = make_config(str(tmp_path / "gpu"), workers=2, steps=8, save_every=4, hidden=(32,))
    expected = cpu_reference(tmp_path, run_coordinator, config)
    coordinator = run_coordinator(with_changes(config, device="gpu"))
    assert coordinator.exchange == "nccl"
    coordinator.run()
    actual = worker_state(coordinator)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-4, atol=1e-6, err_msg=name)

"""Device selection: numpy for cpu, a clear error for an unusable gpu, fallback for auto."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from orchestrator.engine import kernels_numpy
from orchestrator.engine.backend import BackendUnavailableError, cupy_backend, get_backend


def _gpu_usable() -> bool:
    try:
        cupy_backend()
    except BackendUnavailableError:
        return False
    return True


def test_cpu_is_numpy():
    backend = get_backend("cpu")
    assert backend.name == "numpy" and backend.xp is np and backend.ops is kernels_numpy
    array = backend.asarray([1, 2], dtype=np.float32)
    assert isinstance(backend.to_host(array), np.ndarray) and array.dtype == np.float32


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="'tpu'"):
        get_backend("tpu")


@pytest.mark.skipif(_gpu_usable(), reason="a CUDA GPU is usable here; the no-GPU behaviour cannot be observed")
def test_gpu_without_cupy_or_device_raises_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="cupy|CUDA"):
        get_backend("gpu")


@pytest.mark.skipif(_gpu_usable(), reason="a CUDA GPU is usable here; auto picks it")
def test_auto_falls_back_to_cpu_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="orchestrator.engine.backend"):
        backend = get_backend("auto")
    assert backend.name == "numpy"
    assert any("falling back to CPU" in record.getMessage() for record in caplog.records)

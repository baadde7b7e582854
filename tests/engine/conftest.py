"""Engine test fixtures: backends (cupy skipped with the reason when unusable) and one BLAS thread.

Tests run on a shared 2-core machine; one BLAS thread keeps them fast under load
(oversubscribed OpenBLAS threads spin) and does not change any result we compare.
"""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_limits

from orchestrator.engine.backend import BackendUnavailableError, cupy_backend, numpy_backend


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def gpu_backend_or_skip():
    try:
        return cupy_backend()
    except BackendUnavailableError as exc:
        pytest.skip(f"no CUDA GPU / cupy not installed: {exc}")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    """Each test using it runs on numpy, and on cupy where a GPU is present."""
    if request.param == "numpy":
        return numpy_backend()
    return gpu_backend_or_skip()


@pytest.fixture
def gpu_backend():
    return gpu_backend_or_skip()

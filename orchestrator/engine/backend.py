"""Array backend: numpy on CPU, cupy on a CUDA GPU, chosen once per process.

Model and optimizer code is written once against ``Backend``: ``xp`` is the array
module and ``ops`` the kernel module with the same function names on both paths
(``kernels_numpy`` or ``kernels_cupy``). cupy is imported only when a GPU is asked
for, so CPU-only installs never need it.

Contract used by the runtime (``orchestrator.cluster``):

    get_backend("cpu" | "gpu" | "auto") -> Backend(name="numpy" | "cupy", xp, ops)
    backend.to_host(array) -> numpy.ndarray      # device -> host copy on cupy
    backend.asarray(array, dtype=None) -> array  # host -> device copy on cupy

``"gpu"`` without cupy or without a visible CUDA device raises ``BackendUnavailableError``;
``"auto"`` falls back to numpy and logs why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from orchestrator.checkpoint.variables import to_host as _variable_to_host
from orchestrator.errors import BadInputError, InvalidArgumentError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu", "auto")


class BackendUnavailableError(BadInputError, RuntimeError):
    """The requested device cannot be used on this machine (no cupy, no CUDA GPU)."""


@dataclass(frozen=True)
class Backend:
    """An array module plus its kernels. ``name`` is "numpy" or "cupy"."""

    name: str
    xp: ModuleType
    ops: ModuleType

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def to_host(self, array: Any) -> np.ndarray:
        """A numpy array for ``array``; on cupy this is a device -> host sync point."""
        return _variable_to_host(array)

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        """``array`` on this backend's device (host -> device copy on cupy)."""
        return self.xp.asarray(array, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on numpy); used by timing code."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


def get_backend(device: str = "cpu") -> Backend:
    """The backend for ``device`` ("cpu", "gpu" or "auto")."""
    if device not in DEVICES:
        raise InvalidArgumentError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return numpy_backend()
    try:
        return cupy_backend()
    except BackendUnavailableError as exc:
        if device == "gpu":
            raise
        log.info("device 'auto': no usable GPU (%s); falling back to CPU (numpy)", exc)
        return numpy_backend()


def numpy_backend() -> Backend:
    from orchestrator.engine import kernels_numpy

    return Backend("numpy", np, kernels_numpy)


def cupy_backend() -> Backend:
    """The cupy backend, or ``BackendUnavailableError`` saying what is missing."""
    cupy = _import_cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises CUDARuntimeError / driver errors here
        raise BackendUnavailableError(f"cupy cannot reach a CUDA driver: {exc}") from exc
    if count < 1:
        raise BackendUnavailableError("cupy found no CUDA device (getDeviceCount() == 0)")
    from orchestrator.engine import kernels_cupy

    return Backend("cupy", cupy, kernels_cupy)


def _import_cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            "device 'gpu' needs cupy: install the 'gpu' extra (pip install 'orchestrator[gpu]')"
        ) from exc
    return cupy

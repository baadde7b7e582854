"""``Variable``: a named, mutable array that models, optimizers and the runtime hold.

The array may live in numpy or cupy; checkpoint code always sees host (numpy)
values through ``numpy()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from orchestrator.errors import InvalidArgumentError


def to_host(array: Any) -> np.ndarray:
    """Return a numpy array for a numpy or cupy array (device to host copy for cupy)."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)  # cupy.ndarray.get() copies device -> host
    if callable(get) and type(array).__module__.startswith("cupy"):
        return get()
    return np.asarray(array)


class Variable:
    """A named array. ``assign`` replaces the value in place of the same name.

    ``trainable`` marks parameters (as opposed to optimizer slots and counters).
    """

    __slots__ = ("name", "value", "trainable")

    def __init__(self, name: str, value: Any, trainable: bool = True):
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"Variable name must be a non-empty string, got {name!r}")
        self.name = name
        # numpy/cupy arrays are kept as they are; a Python scalar or list becomes a numpy array
        # (as tf.Variable(3.5) does), since shape, dtype and assign need an array
        self.value = value if hasattr(value, "shape") and hasattr(value, "dtype") else np.asarray(value)
        self.trainable = trainable

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.value.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.value.nbytes)

    def numpy(self) -> np.ndarray:
        return to_host(self.value)

    def assign(self, value: Any) -> None:
        """Set the value, keeping this variable's array module (numpy or cupy).

        A numpy ``str``/``bytes`` variable keeps its kind but not its width: a checkpoint's
        strings (``bytes``) may be longer than the ones it held, and a fixed width would cut them.
        """
        if self.dtype.kind in "SU":
            self.value = _strings(value, self.dtype.kind).reshape(self.value.shape)
            return
        xp = _array_module(self.value)
        self.value = xp.asarray(value, dtype=self.value.dtype).reshape(self.value.shape)

    def __repr__(self) -> str:
        return f"Variable({self.name!r}, shape={self.shape}, dtype={self.dtype})"


def _strings(value: Any, kind: str) -> np.ndarray:
    """``value``'s items as a numpy ``str`` (kind ``U``: bytes decoded as UTF-8) or ``bytes`` array."""
    items = np.asarray(value, dtype=object).reshape(-1).tolist()
    if kind == "U":
        items = [x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else str(x) for x in items]
        return np.array(items, dtype=str) if items else np.zeros(0, dtype="U1")
    items = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in items]
    return np.array(items, dtype=bytes) if items else np.zeros(0, dtype="S1")


def _array_module(array: Any):
    if type(array).__module__.startswith("cupy"):
        import cupy  # only reached when the value already is a cupy array

        return cupy
    return np

"""The one error base of the project.

``OrchestratorError`` carries its message and pickles with it (``__reduce__``), so a
subclass raised in a Ray actor reaches the driver intact. Each package has its own base
on top: ``checkpoint.errors.CheckpointError`` and ``cluster.errors.ClusterError``;
subclasses with more fields override ``__reduce__`` to carry them.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of the project's typed errors; ``str()`` is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message

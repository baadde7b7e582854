"""The one error base of the project.

``OrchestratorError`` carries its message and pickles with it (``__reduce__``), so a
subclass raised in a Ray actor reaches the driver intact. Each package has its own base
on top: ``checkpoint.errors.CheckpointError`` and ``cluster.errors.ClusterError``;
subclasses with more fields override ``__reduce__`` to carry them.

``BadInputError`` marks the errors caused by what the user gave (the config, the data,
a path, the contents of a checkpoint): running again cannot help, the input must change.
The CLI exits with 2 for these and 1 for every other failure (``exit_codes``).
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


class BadInputError(OrchestratorError):
    """The input is wrong (config, data, path, checkpoint contents): exit code 2, no retry."""


class KeyedError(OrchestratorError):
    """An error that names the config key at fault (``model.factory``, ``data.labels``), so the
    CLI can point at that key's file:line; ``key`` is None when no single key is to blame."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        return (type(self), (self.message, self.key))


class InvalidArgumentError(BadInputError, ValueError, TypeError):
    """A Python API argument is out of range or of the wrong kind (a ``ValueError``/``TypeError`` too)."""

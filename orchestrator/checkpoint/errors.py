"""Typed errors of the checkpoint library.

One base, ``CheckpointError``; subclasses say what went wrong, and every message
names the file (and the tensor, where there is one). Subclasses also inherit a
builtin where the meaning matches (``CheckpointNotFoundError`` is a
``FileNotFoundError``), so generic handlers keep working. All errors pickle with
their message, so they cross Ray actor boundaries intact.
"""

from __future__ import annotations

from orchestrator.errors import OrchestratorError


class CheckpointError(OrchestratorError):
    """Base of every error raised by ``orchestrator.checkpoint``."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, its index, one of its data shards, or a tensor is missing."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A file is structurally invalid: truncated, wrong magic, bad sizes or offsets."""


class CRCMismatchError(CorruptCheckpointError):
    """A block or tensor checksum does not match its bytes."""


class UnsupportedVersionError(CheckpointError, ValueError):
    """The checkpoint was written by a producer version we cannot read."""


class UnsupportedDtypeError(CheckpointError, TypeError):
    """A tensor's dtype cannot be stored in (or read from) a TF V2 checkpoint."""


class InvalidCheckpointWriteError(CheckpointError, ValueError):
    """The tensors or shard results handed to a writer cannot form a valid checkpoint."""

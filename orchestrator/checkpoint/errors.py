"""Typed errors of the checkpoint library.

One base, ``CheckpointError``; subclasses say what went wrong (those about a checkpoint's
contents or the caller's tensors are also ``BadInputError``s), and every message
names the file (and the tensor, where there is one). Subclasses also inherit a
builtin where the meaning matches (``CheckpointNotFoundError`` is a
``FileNotFoundError``), so generic handlers keep working. All errors pickle with
their message, so they cross Ray actor boundaries intact.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from orchestrator.errors import BadInputError, OrchestratorError


class CheckpointError(OrchestratorError):
    """Base of every error raised by ``orchestrator.checkpoint``."""


class CheckpointNotFoundError(CheckpointError, BadInputError, FileNotFoundError):
    """A checkpoint, its index, one of its data shards, or a tensor is missing."""


class CorruptCheckpointError(CheckpointError, BadInputError, ValueError):
    """A file is structurally invalid: truncated, wrong magic, bad sizes or offsets."""


class CRCMismatchError(CorruptCheckpointError):
    """A block or tensor checksum does not match its bytes."""


class UnsupportedVersionError(CheckpointError, BadInputError, ValueError):
    """The checkpoint was written by a producer version we cannot read."""


class UnsupportedDtypeError(CheckpointError, BadInputError, TypeError):
    """A tensor's dtype cannot be stored in (or read from) a TF V2 checkpoint."""


class InvalidCheckpointWriteError(CheckpointError, BadInputError, ValueError):
    """The tensors or shard results handed to a writer cannot form a valid checkpoint."""


class SaveFailedError(CheckpointError):
    """A save failed and nothing of it was committed: the previous checkpoint stays the latest.

    ``failures`` maps each failed part (a shard id, or ``"index"``) to its cause: the
    exception, or its text when it was raised in another process. Every entry point of
    the save pipeline raises this one type, whichever part failed.
    """

    def __init__(self, prefix: str, failures: Mapping[Any, BaseException | str]):
        self.prefix = prefix
        self.failures = dict(failures)
        lines = [f"  {_part(k)}: {_cause(e)}" for k, e in sorted(self.failures.items(), key=str)]
        super().__init__(f"save of {prefix} failed, nothing committed:\n" + "\n".join(lines))

    @property
    def step(self) -> int | None:
        """The global step the failed checkpoint was for (its prefix's suffix), if any."""
        match = re.search(r"-(\d+)$", self.prefix)
        return int(match.group(1)) if match else None

    def __reduce__(self):
        return (type(self), (self.prefix, self.failures))


class StateUpdateError(CheckpointError, OSError):
    """A checkpoint was committed (its index is written) but the bookkeeping after it failed.

    The state file, the manager's sidecar or a retention deletion could not be written.
    The checkpoint itself is complete and the next start adopts it; the state file on
    storage may still name the previous one as latest.
    """

    def __init__(self, prefix: str, cause: BaseException | str):
        self.prefix = prefix
        self.cause = _cause(cause)
        super().__init__(f"checkpoint {prefix} is committed, but updating the checkpoint state after it failed: "
                         f"{self.cause}")

    def __reduce__(self):
        return (type(self), (self.prefix, self.cause))


def _part(key: Any) -> str:
    return f"shard {key}" if isinstance(key, int) else str(key)


def _cause(error: BaseException | str) -> str:
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"

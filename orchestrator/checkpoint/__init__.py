"""TensorFlow V2-format checkpoints ("tensor bundles") over fsspec. Never imports Ray."""

from orchestrator.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    CRCMismatchError,
    UnsupportedVersionError,
)
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.variables import Variable

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "CRCMismatchError",
    "UnsupportedVersionError",
    "Storage",
    "Variable",
]

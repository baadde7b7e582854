"""TensorFlow V2-format checkpoints ("tensor bundles") over fsspec. Never imports Ray.

Format layer: ``write_checkpoint``/``load_checkpoint`` for whole checkpoints,
``ShardWriter`` + ``write_index`` for shards written by independent processes, and the
``checkpoint`` state file helpers. Every path is a local path or an fsspec URL.

Policy layer: ``Saver`` (TF1 ``tf.train.Saver`` semantics), ``CheckpointManager``
(directory-level retention and the atomic commit protocol), the model structure record
and the safetensors export.
"""

from orchestrator.checkpoint.bundle import (
    ShardResult,
    ShardWriter,
    data_filename,
    index_filename,
    write_index,
)
from orchestrator.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    CRCMismatchError,
    InvalidCheckpointWriteError,
    SaveFailedError,
    StateUpdateError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from orchestrator.checkpoint.export import Exported, export_checkpoint, export_safetensors
from orchestrator.checkpoint.manager import CheckpointInfo, CheckpointManager, list_checkpoints
from orchestrator.checkpoint.reader import CheckpointReader, TensorEntry, list_variables, load_checkpoint
from orchestrator.checkpoint.safetensors_file import SafetensorsReader, open_tensors
from orchestrator.checkpoint.saver import RestoreMismatchError, Saver
from orchestrator.checkpoint.state import (
    CheckpointState,
    get_checkpoint_state,
    latest_checkpoint,
    update_checkpoint_state,
)
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint.structure import STRUCTURE_KEY, read_structure
from orchestrator.checkpoint.variables import Variable
from orchestrator.checkpoint.writer import write_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "CRCMismatchError",
    "InvalidCheckpointWriteError",
    "UnsupportedDtypeError",
    "UnsupportedVersionError",
    "Storage",
    "Variable",
    "ShardResult",
    "ShardWriter",
    "data_filename",
    "index_filename",
    "write_index",
    "CheckpointReader",
    "TensorEntry",
    "list_variables",
    "load_checkpoint",
    "CheckpointState",
    "get_checkpoint_state",
    "latest_checkpoint",
    "update_checkpoint_state",
    "write_checkpoint",
    "Saver",
    "RestoreMismatchError",
    "SaveFailedError",
    "StateUpdateError",
    "CheckpointManager",
    "CheckpointInfo",
    "list_checkpoints",
    "STRUCTURE_KEY",
    "read_structure",
    "export_safetensors",
    "export_checkpoint",
    "Exported",
    "SafetensorsReader",
    "open_tensors",
]

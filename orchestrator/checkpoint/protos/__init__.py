"""Our own copies of the TensorFlow protos a V2 checkpoint uses (same field numbers).

They live in the ``orchestrator.tfcompat`` proto package, not ``tensorflow``, so they
never collide with TensorFlow's descriptors when both are imported in one process;
only field numbers (and, for the text-format state file, field names) must match.
Regenerate the ``*_pb2`` modules with ``python scripts/gen_protos.py``.
"""

from orchestrator.checkpoint.protos.checkpoint_state_pb2 import CheckpointState
from orchestrator.checkpoint.protos.tensor_bundle_pb2 import BundleEntryProto, BundleHeaderProto
from orchestrator.checkpoint.protos.tensor_shape_pb2 import TensorShapeProto
from orchestrator.checkpoint.protos.tensor_slice_pb2 import TensorSliceProto
from orchestrator.checkpoint.protos.versions_pb2 import VersionDef

__all__ = [
    "BundleEntryProto",
    "BundleHeaderProto",
    "CheckpointState",
    "TensorShapeProto",
    "TensorSliceProto",
    "VersionDef",
]

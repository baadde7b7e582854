"""Our .proto copies: generated modules are current and the wire bytes match TensorFlow's."""

import pathlib
import subprocess
import sys

from orchestrator.checkpoint import protos
from orchestrator.checkpoint.bundle import header_bytes, make_entry

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_generated_modules_are_current():
    # protoc runs in its own process: grpc_tools' in-process protoc can crash a process that
    # already loaded TensorFlow/upb (seen as a segfault in the full suite).
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"run: python scripts/gen_protos.py\n{proc.stdout}{proc.stderr}"
    names = {p.name for p in (REPO / "orchestrator" / "checkpoint" / "protos").glob("*_pb2.py")}
    assert names == {"checkpoint_state_pb2.py", "tensor_bundle_pb2.py", "tensor_shape_pb2.py",
                     "tensor_slice_pb2.py", "versions_pb2.py"}


def test_generated_modules_carry_no_runtime_version_pin():
    for path in (REPO / "orchestrator" / "checkpoint" / "protos").glob("*_pb2.py"):
        text = path.read_text()
        assert "ValidateProtobufRuntimeVersion" not in text, path
        assert "runtime_version" not in text, path


def test_descriptors_live_outside_tensorflow_namespace():
    # TF registers `tensorflow.BundleEntryProto`; ours must not collide in the same process.
    assert protos.BundleEntryProto.DESCRIPTOR.full_name == "orchestrator.tfcompat.BundleEntryProto"
    assert protos.CheckpointState.DESCRIPTOR.full_name == "orchestrator.tfcompat.CheckpointState"


def test_field_numbers_match_tensorflow():
    fields = {f.name: f.number for f in protos.BundleEntryProto.DESCRIPTOR.fields}
    assert fields == {"dtype": 1, "shape": 2, "shard_id": 3, "offset": 4, "size": 5, "crc32c": 6, "slices": 7}
    header = {f.name: f.number for f in protos.BundleHeaderProto.DESCRIPTOR.fields}
    assert header == {"num_shards": 1, "endianness": 2, "version": 3}
    state = {f.name: f.number for f in protos.CheckpointState.DESCRIPTOR.fields}
    assert state == {"model_checkpoint_path": 1, "all_model_checkpoint_paths": 2,
                     "all_model_checkpoint_timestamps": 3, "last_preserved_timestamp": 4}
    assert {f.name: f.number for f in protos.TensorShapeProto.DESCRIPTOR.fields} == {"dim": 2, "unknown_rank": 3}
    assert {f.name: f.number for f in protos.VersionDef.DESCRIPTOR.fields} == {
        "producer": 1, "min_consumer": 2, "bad_consumers": 3}


def test_serialized_bytes_match_the_reference():
    assert header_bytes(1).hex() == "08011a020801"
    entry = make_entry(1, (2,), size=8, masked_crc=0x35E53C59)
    assert entry.SerializeToString().hex() == "0801120412020802280835593ce535"
    assert make_entry(1, (), size=4).SerializeToString().hex() == "0801120028" + "04"  # scalar: `12 00`
    assert make_entry(1, (2, 3)).shape.SerializeToString().hex() == "1202080212020803"
    assert make_entry(1, (0,)).shape.SerializeToString().hex() == "1200"


def test_slice_extent_encoding_distinguishes_full_and_zero_length():
    proto = protos.TensorSliceProto()
    full = proto.extent.add()
    zero_start = proto.extent.add(length=4)
    offset = proto.extent.add(start=4, length=3)
    assert not full.HasField("length") and zero_start.HasField("length")
    assert offset.start == 4
    assert proto.SerializeToString().hex() == "0a00" + "0a021004" + "0a0408041003"

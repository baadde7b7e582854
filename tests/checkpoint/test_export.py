"""The model structure record and the safetensors export."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from orchestrator.checkpoint import reader
from orchestrator.checkpoint.errors import CorruptCheckpointError, UnsupportedVersionError
from orchestrator.checkpoint.export import ExportError, encode_safetensors, export_checkpoint, export_safetensors
from orchestrator.checkpoint.manager import CheckpointManager
from orchestrator.checkpoint.structure import (STRUCTURE_FORMAT, STRUCTURE_KEY, decode_structure,
                                               encode_structure, read_structure, structure_tensors)

SPEC = {"kind": "mlp", "input_dim": 4, "hidden": [3], "num_classes": 2, "activation": "relu"}
PARAMS = {
    "dense/kernel": np.arange(12, dtype=np.float32).reshape(4, 3) / 7,
    "dense/bias": np.array([1e-30, -0.0, np.inf], np.float32),
    "dense_1/kernel": np.linspace(-1, 1, 6).reshape(3, 2),  # float64
    "dense_1/bias": np.array([3, -4], np.int32),
}
NOT_PARAMS = {
    "dense/kernel/RMSProp": np.ones((4, 3), np.float32),
    "dense/kernel/RMSProp_1": np.zeros((4, 3), np.float32),
    "global_step": np.array(1000, np.int64),
}


@pytest.fixture
def checkpoint(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    tensors = {**PARAMS, **NOT_PARAMS, **structure_tensors(SPEC, list(PARAMS))}
    return manager.save(tensors, step=1000, num_shards=2)


def test_structure_round_trips_through_a_checkpoint(checkpoint):
    ckpt = reader.CheckpointReader(checkpoint)
    assert ckpt.get_variable_to_dtype_map()[STRUCTURE_KEY] == np.dtype(object)
    assert ckpt.get_variable_to_shape_map()[STRUCTURE_KEY] == []
    record = read_structure(ckpt)
    assert record == {"format": STRUCTURE_FORMAT, "spec": SPEC, "variables": list(PARAMS)}


def test_checkpoint_without_structure_reads_none(tmp_path):
    prefix = CheckpointManager(str(tmp_path)).save(PARAMS, step=1)
    assert read_structure(reader.CheckpointReader(prefix)) is None


@pytest.mark.parametrize("payload, error, match", [
    (b"{not json", CorruptCheckpointError, "not valid JSON"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, CorruptCheckpointError, "not valid JSON", id="nested-too-deep"),
    (pickle.dumps({"format": STRUCTURE_FORMAT}), CorruptCheckpointError, "not valid JSON"),
    (b'["a list"]', CorruptCheckpointError, "JSON object"),
    (b'{"format": "orchestrator.model/9", "spec": {}, "variables": []}', UnsupportedVersionError, "model/9"),
    (b'{"format": "orchestrator.model/1", "spec": [], "variables": []}', CorruptCheckpointError, "'spec'"),
    (b'{"format": "orchestrator.model/1", "spec": {}, "variables": [1]}', CorruptCheckpointError, "'variables'"),
])
def test_bad_structure_records_raise_typed_errors(payload, error, match):
    with pytest.raises(error, match=match):
        decode_structure(np.array(payload, dtype=object), where="ckpt:_MODEL_STRUCTURE")


def test_encode_rejects_duplicate_variables():
    with pytest.raises(ValueError, match="duplicate"):
        encode_structure(SPEC, ["a", "a"])


def test_export_writes_only_parameters_bit_exact(checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    out = export_safetensors(checkpoint, str(tmp_path / "model.safetensors"))
    loaded = load_file(out)
    assert sorted(loaded) == sorted(PARAMS)
    for name, value in PARAMS.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        assert loaded[name].tobytes() == value.tobytes()
    with safe_open(out, framework="numpy") as f:
        metadata = f.metadata()
    assert metadata["format"] == STRUCTURE_FORMAT
    assert json.loads(metadata["structure"]) == {"format": STRUCTURE_FORMAT, "spec": SPEC,
                                                 "variables": list(PARAMS)}


def test_export_from_a_directory_uses_its_latest_checkpoint(checkpoint, tmp_path):
    from safetensors.numpy import load_file

    out = export_safetensors(str(tmp_path / "ckpt"), str(tmp_path / "latest.safetensors"))
    np.testing.assert_array_equal(load_file(out)["dense/kernel"], PARAMS["dense/kernel"])


def test_export_header_is_aligned_and_offsets_are_contiguous():
    payload = encode_safetensors({"b": np.ones(3, np.float16), "a": np.zeros((2, 2), np.uint8)}, {"k": "v"})
    (length,) = struct.unpack("<Q", payload[:8])
    assert length % 8 == 0
    header = json.loads(payload[8:8 + length])
    assert header["a"] == {"dtype": "U8", "shape": [2, 2], "data_offsets": [0, 4]}
    assert header["b"] == {"dtype": "F16", "shape": [3], "data_offsets": [4, 10]}
    assert len(payload) == 8 + length + 10


def test_export_without_structure_writes_every_tensor_and_says_what_is_missing(tmp_path):
    from safetensors.numpy import load_file

    tensors = {**PARAMS, **NOT_PARAMS, "names": np.array([b"a", b"b"], dtype=object)}
    plain = CheckpointManager(str(tmp_path / "a")).save(tensors, step=1)
    exported = export_checkpoint(plain, str(tmp_path / "x.safetensors"))
    assert not exported.has_structure
    loaded = load_file(exported.path)
    assert sorted(loaded) == sorted({**PARAMS, **NOT_PARAMS}) == exported.tensors
    for name, value in {**PARAMS, **NOT_PARAMS}.items():
        assert loaded[name].tobytes() == np.asarray(value).tobytes()
    assert "no model structure record" in exported.notes[0] and "structure=model" in exported.notes[0]
    assert "'names'" in exported.notes[1]


def test_export_with_an_unexportable_model_tensor_fails_and_writes_nothing(tmp_path):
    strings = {"names": np.array([b"a", b"b"], dtype=object), **structure_tensors(SPEC, ["names"])}
    prefix = CheckpointManager(str(tmp_path / "b")).save(strings, step=1)
    with pytest.raises(ExportError, match="'names'"):
        export_safetensors(prefix, str(tmp_path / "y.safetensors"))
    assert not (tmp_path / "y.safetensors").exists()


def test_export_from_s3_to_a_local_file(s3_bucket, s3_options, tmp_path):
    from safetensors.numpy import load_file

    tensors = {**PARAMS, **NOT_PARAMS, **structure_tensors(SPEC, list(PARAMS))}
    prefix = CheckpointManager(s3_bucket + "/ckpt", storage_options=s3_options).save(tensors, step=5)
    out = export_safetensors(prefix, str(tmp_path / "m.safetensors"), storage_options=s3_options)
    assert sorted(load_file(out)) == sorted(PARAMS)

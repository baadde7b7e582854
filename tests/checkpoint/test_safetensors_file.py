"""Reading ``.safetensors`` files: files the reference library writes, and hostile headers."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from orchestrator.checkpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from orchestrator.checkpoint.safetensors_file import SafetensorsReader, encode_safetensors, open_tensors
from orchestrator.checkpoint.structure import STRUCTURE_KEY, read_structure, structure_tensors

TENSORS = {
    "f32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "bf16": np.array([1.5, -2.25, 3e38], ml_dtypes.bfloat16),
    "i8": np.array([-128, 0, 127], np.int8),
    "u64": np.array([2**64 - 1], np.uint64),
    "flag": np.array([[True, False]]),
    "scalar": np.array(2.5, np.float64),
    "empty": np.zeros((0, 3), np.float16),
}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_reads_what_the_reference_library_writes(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = str(tmp_path / "ref.safetensors")
    safetensors_numpy.save_file(TENSORS, path, metadata={"who": "reference"})
    with open_tensors(path) as reader:
        assert isinstance(reader, SafetensorsReader)
        assert reader.keys() == sorted(TENSORS) and reader.metadata == {"who": "reference"}
        values = reader.get_tensors()
        assert all(_same(values[name], value) for name, value in TENSORS.items())
        values["f32"][0, 0] = 7.0  # a writable copy, not a view of the file's bytes
        assert read_structure(reader) is None


def test_the_reference_library_reads_what_we_write_and_the_structure_reads_back(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    record = structure_tensors({"kind": "mlp"}, ["f32"])[STRUCTURE_KEY].item().decode()
    path = tmp_path / "ours.safetensors"
    path.write_bytes(encode_safetensors(TENSORS, {"structure": record}))
    loaded = safetensors_numpy.load_file(str(path))
    assert all(_same(loaded[name], value) for name, value in TENSORS.items())
    reader = SafetensorsReader(str(path))
    assert STRUCTURE_KEY in reader.keys() and reader.entry(STRUCTURE_KEY).dtype_name == "string"
    assert read_structure(reader)["spec"] == {"kind": "mlp"}


def _file(tmp_path, header: dict, data: bytes = b"", length: int | None = None) -> str:
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return str(path)


@pytest.mark.parametrize("header, data, length, match", [
    ({}, b"", 1 << 40, "exceeds the file"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "cover 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "unknown or missing dtype"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6, None, "contiguous"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "bad shape"),
    ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
    ({STRUCTURE_KEY: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "reserved"),
])
def test_hostile_headers_raise_corrupt_checkpoint_naming_the_file(tmp_path, header, data, length, match):
    path = _file(tmp_path, header, data, length)
    with pytest.raises(CorruptCheckpointError, match=match) as caught:
        SafetensorsReader(path)
    assert path in str(caught.value)


def test_header_that_is_not_json_and_a_missing_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\x80abc")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        SafetensorsReader(str(path))
    deep = b"[" * 100_000 + b"]" * 100_000  # valid JSON nested past Python's recursion limit
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(CorruptCheckpointError, match="junk.safetensors.*not valid JSON"):
        SafetensorsReader(str(path))
    with pytest.raises(CheckpointNotFoundError, match="missing.safetensors"):
        open_tensors(str(tmp_path / "missing.safetensors"))

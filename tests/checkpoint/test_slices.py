"""Partitioned tensors: TF's slice key encoding, slice protos, writing and reassembly."""

import ml_dtypes
import numpy as np
import pytest

from orchestrator.checkpoint import bundle, reader, slices
from orchestrator.checkpoint.errors import (
    CorruptCheckpointError,
    InvalidCheckpointWriteError,
    UnsupportedDtypeError,
)
from orchestrator.checkpoint.protos import BundleEntryProto
from orchestrator.checkpoint.slices import Extent
from orchestrator.checkpoint.storage import Storage


@pytest.mark.parametrize("value, encoded", [
    (0, "80"), (4, "84"), (-1, "7f"), (63, "bf"), (-64, "40"), (64, "c040"), (8191, "dfff"), (8192, "e02000"),
    (10000, "e02710"), (1000000, "ef4240"), (2**20, "f0100000"), (2**34, "fc0400000000"),
    (2**40 + 5, "fd0000000005"),
])
def test_signed_num_increasing_matches_tensorflow(value, encoded):
    assert slices.encode_signed_num_increasing(value).hex() == encoded


def test_signed_encoding_preserves_order():
    values = [-(2**62), -(2**40), -70000, -65, -64, -1, 0, 1, 63, 64, 8191, 8192, 2**34, 2**62]
    encoded = [slices.encode_signed_num_increasing(v) for v in values]
    assert encoded == sorted(encoded)


def test_num_increasing_and_string_escapes():
    assert [slices.encode_num_increasing(v).hex() for v in (0, 2, 300)] == ["00", "0102", "02012c"]
    assert slices.encode_string(b"a\xffb\x00c").hex() == "61ff006200ff630001"


def test_slice_keys_match_the_reference_examples():
    p = [slices.slice_key(b"p", [Extent(s, n), Extent(0, 4)]).hex() for s, n in ((0, 4), (4, 3), (7, 3))]
    assert p == ["00700001010280848084", "00700001010284838084", "00700001010287838084"]
    key = slices.slice_key(b"a\xffb\x00c", [Extent(1, 2), Extent(0, slices.FULL)])
    assert key.hex() == "00" "61ff006200ff63" "0001" "0102" "8182" "807f"


def test_slice_proto_follows_tensorflow_serialization():
    proto = slices.to_proto([Extent(0, slices.FULL), Extent(0, 4), Extent(4, 3)])
    assert proto.SerializeToString().hex() == "0a00" "0a021004" "0a0408041003"
    assert slices.from_proto(proto) == [Extent(0, -1), Extent(0, 4), Extent(4, 3)]


def _partitioned(tmp_path, full, cuts, dtype_shards=2):
    """Write `full` split along dim 0 at `cuts`, pieces round-robin over shards."""
    storage, prefix = Storage.for_path(str(tmp_path / "p"))
    writers = [bundle.ShardWriter(prefix, i, dtype_shards, storage) for i in range(dtype_shards)]
    bounds = [0, *cuts, full.shape[0]]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        starts = [lo] + [0] * (full.ndim - 1)
        lengths = [hi - lo] + list(full.shape[1:])
        writers[i % dtype_shards].add_slice("part", full.shape, starts, lengths, full[lo:hi])
    results = [w.finish() for w in writers]
    bundle.write_index(prefix, results, storage)
    return prefix, results


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.bool_, ml_dtypes.bfloat16, np.complex128])
def test_partitioned_tensor_reassembles_across_shards(tmp_path, dtype):
    full = (np.arange(40).reshape(10, 4) % 3).astype(dtype)
    prefix, results = _partitioned(tmp_path, full, [4, 7])
    assert "part" in results[0].entries and "part" in results[1].entries  # full entry from each shard
    r = reader.CheckpointReader(prefix)
    assert r.keys() == ["part"]  # slice keys are hidden
    assert r.get_variable_to_shape_map() == {"part": [10, 4]}
    got = r.get_tensor("part")
    assert got.dtype == np.dtype(dtype) and got.tobytes() == full.tobytes()
    assert len(r.entry("part").slices) == 3
    assert r.stored_nbytes("part") == full.nbytes
    r.verify()


def test_slice_of_2d_partition_with_full_extent(tmp_path):
    full = np.arange(24, dtype=np.float64).reshape(4, 6)
    storage, prefix = Storage.for_path(str(tmp_path / "q"))
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    w.add_slice("q", (4, 6), [0, 0], [-1, 2], full[:, 0:2])
    w.add_slice("q", (4, 6), [0, 2], [-1, 4], full[:, 2:6])
    bundle.write_index(prefix, [w.finish()], storage)
    assert np.array_equal(reader.CheckpointReader(prefix).get_tensor("q"), full)


def test_slice_covering_the_whole_tensor_is_an_ordinary_entry(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "w"))
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    w.add_slice("w", (2, 3), [0, 0], [2, 3], np.ones((2, 3), np.float16))  # float16 fine when whole
    result = w.finish()
    assert list(result.entries) == ["w"]
    assert not BundleEntryProto.FromString(result.entries["w"]).slices


def test_dtypes_tensorflow_cannot_reassemble_are_refused(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "h"))
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    for dtype in (np.float16, np.uint16, np.uint32, np.uint64):
        with pytest.raises(UnsupportedDtypeError, match="cannot reassemble"):
            w.add_slice(f"h{np.dtype(dtype).name}", (4,), [0], [2], np.ones(2, dtype))


def test_bad_slices_are_refused(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "b"))
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    with pytest.raises(InvalidCheckpointWriteError, match="outside"):
        w.add_slice("b", (4,), [3], [2], np.ones(2, np.float32))
    with pytest.raises(InvalidCheckpointWriteError, match="shape"):
        w.add_slice("b", (4,), [0], [2], np.ones(3, np.float32))
    w.add_slice("b", (4,), [0], [2], np.ones(2, np.float32))
    with pytest.raises(InvalidCheckpointWriteError, match="added twice"):
        w.add_slice("b", (4,), [0], [2], np.ones(2, np.float32))
    with pytest.raises(InvalidCheckpointWriteError, match="does not match"):
        w.add_slice("b", (4,), [2], [2], np.ones(2, np.float64))
    with pytest.raises(InvalidCheckpointWriteError, match="added twice"):
        w.add("b", np.ones(4, np.float32))
    w.add_slice("b", (4,), [2], [2], np.zeros(2, np.float32))
    bundle.write_index(prefix, [w.finish()], storage)
    r = reader.CheckpointReader(prefix)  # the refused pieces left no trace in the full entry
    assert len(r.entry("b").slices) == 2
    assert r.get_tensor("b").tolist() == [1, 1, 0, 0]


def test_shards_disagreeing_on_full_shape_are_refused(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "d"))
    w0, w1 = (bundle.ShardWriter(prefix, i, 2, storage) for i in range(2))
    w0.add_slice("d", (4,), [0], [2], np.ones(2, np.float32))
    w1.add_slice("d", (5,), [2], [2], np.ones(2, np.float32))
    with pytest.raises(InvalidCheckpointWriteError, match="disagree"):
        bundle.write_index(prefix, [w0.finish(), w1.finish()], storage)


def _rewrite_index(prefix, results, drop=None):
    entries, n = bundle.merge_results(results)
    if drop:
        entries = {k: v for k, v in entries.items() if k != drop}
    storage, _ = Storage.for_path(prefix)
    storage.write_bytes(bundle.index_filename(prefix), bundle.build_index_bytes(entries, n))


def test_missing_slice_entry_is_a_typed_error(tmp_path):
    full = np.arange(12, dtype=np.float32).reshape(6, 2)
    prefix, results = _partitioned(tmp_path, full, [3])
    slice_key = next(k for k in results[1].entries if k.startswith("\x00"))
    _rewrite_index(prefix, results, drop=slice_key)
    with pytest.raises(CorruptCheckpointError, match="slice of partitioned tensor 'part' is missing"):
        reader.CheckpointReader(prefix).get_tensor("part")


def test_slices_that_do_not_cover_the_tensor_are_a_typed_error(tmp_path):
    storage, prefix = Storage.for_path(str(tmp_path / "g"))
    w = bundle.ShardWriter(prefix, 0, 1, storage)
    w.add_slice("g", (6,), [0], [2], np.ones(2, np.int32))
    w.add_slice("g", (6,), [4], [2], np.ones(2, np.int32))
    bundle.write_index(prefix, [w.finish()], storage)
    with pytest.raises(CorruptCheckpointError, match="'g'"):
        reader.CheckpointReader(prefix).get_tensor("g")

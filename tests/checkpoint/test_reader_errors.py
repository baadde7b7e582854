"""Damaged checkpoints: each fault raises a typed error naming the file (and tensor)."""

import os

import numpy as np
import pytest

from orchestrator.checkpoint import bundle, reader, writer
from orchestrator.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    CRCMismatchError,
    UnsupportedVersionError,
)
from orchestrator.checkpoint.protos import BundleEntryProto, BundleHeaderProto
from orchestrator.checkpoint.storage import Storage
from orchestrator.checkpoint import table


@pytest.fixture
def ckpt(tmp_path):
    tensors = {"weights": np.arange(1000, dtype=np.float32), "names": np.array([b"ab", b"c"], object)}
    return writer.write_checkpoint(str(tmp_path / "m"), tensors)


def _index(prefix):
    return prefix + ".index"


def _data(prefix):
    return bundle.data_filename(prefix, 0, 1)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _rewrite_entry(prefix, name, **changes):
    """Rewrite the index with one entry's fields changed (a valid table, bad content)."""
    parsed = table.Table(open(_index(prefix), "rb").read(), "x")
    items = dict(parsed.items())
    entry = BundleEntryProto.FromString(items[name.encode()])
    for field, value in changes.items():
        if field == "shape":
            del entry.shape.dim[:]
            for d in value:
                entry.shape.dim.add(size=d)
        else:
            setattr(entry, field, value)
    items[name.encode()] = entry.SerializeToString()
    with open(_index(prefix), "wb") as f:
        f.write(table.build_table(sorted(items.items())))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"nothing\.index"):
        reader.CheckpointReader(str(tmp_path / "nothing"))


@pytest.mark.parametrize("keep", [0, 10, 47, 60, -1])
def test_truncated_index(ckpt, keep):
    data = open(_index(ckpt), "rb").read()
    open(_index(ckpt), "wb").write(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(CorruptCheckpointError, match=r"m\.index"):
        reader.CheckpointReader(ckpt)


def test_wrong_magic(ckpt):
    _flip(_index(ckpt), os.path.getsize(_index(ckpt)) - 3)
    with pytest.raises(CorruptCheckpointError, match=r"m\.index.*magic"):
        reader.CheckpointReader(ckpt)


def test_every_single_bit_flip_in_the_index_is_caught_or_harmless(ckpt):
    original = open(_index(ckpt), "rb").read()
    caught = 0
    for offset in range(len(original)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        open(_index(ckpt), "wb").write(damaged)
        try:
            r = reader.CheckpointReader(ckpt)
            values = [r.get_tensor(n) for n in r.keys()]
        except CheckpointError as exc:
            assert "m.index" in str(exc) or "m.data" in str(exc)
            caught += 1
            continue
        # only footer padding is unchecked; the values must then be intact
        assert offset >= len(original) - 48
        assert values[1].tolist() == list(range(1000))
    assert caught >= len(original) - 48


def test_tensor_crc_mismatch_names_file_and_tensor(ckpt):
    r = reader.CheckpointReader(ckpt)
    _flip(_data(ckpt), r.entry("weights").offset + 100)
    with pytest.raises(CRCMismatchError, match=r"m\.data-00000-of-00001: tensor 'weights'"):
        r.get_tensor("weights")
    assert r.get_tensor("names").tolist() == [b"ab", b"c"]
    with pytest.raises(CRCMismatchError, match="'weights'"):
        r.verify()


def test_string_tensor_corruption(ckpt):
    r = reader.CheckpointReader(ckpt)
    entry = r.entry("names")
    _flip(_data(ckpt), entry.offset + 2)  # inside the length CRC
    with pytest.raises(CRCMismatchError, match="'names'.*string lengths"):
        r.get_tensor("names")
    _flip(_data(ckpt), entry.offset + 2)
    _flip(_data(ckpt), entry.offset + entry.size - 1)  # inside the bytes
    with pytest.raises(CRCMismatchError, match="'names'"):
        r.get_tensor("names")


def test_string_lengths_inconsistent_with_size(ckpt):
    entry = reader.CheckpointReader(ckpt).entry("names")
    _rewrite_entry(ckpt, "names", size=entry.size - 1)
    with pytest.raises(CorruptCheckpointError, match="'names'.*do not add up"):
        reader.CheckpointReader(ckpt).get_tensor("names")


def test_missing_data_shard(ckpt):
    os.remove(_data(ckpt))
    r = reader.CheckpointReader(ckpt)
    with pytest.raises(CheckpointNotFoundError, match=r"m\.data-00000-of-00001.*'weights'"):
        r.get_tensor("weights")


def test_truncated_data_file(ckpt):
    with open(_data(ckpt), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptCheckpointError, match=r"m\.data-00000-of-00001: tensor 'weights'.*beyond the file"):
        reader.CheckpointReader(ckpt).get_tensor("weights")


def test_entry_size_inconsistent_with_dtype_and_shape(ckpt):
    _rewrite_entry(ckpt, "weights", size=3996)
    with pytest.raises(CorruptCheckpointError, match=r"m\.index: tensor 'weights': entry size 3996"):
        reader.CheckpointReader(ckpt)


def test_offset_beyond_the_file(ckpt):
    _rewrite_entry(ckpt, "weights", offset=10**9)
    r = reader.CheckpointReader(ckpt)
    with pytest.raises(CorruptCheckpointError, match="'weights' at offset 1000000000.*beyond the file"):
        r.get_tensor("weights")


def test_absurd_declared_size_fails_before_allocating(ckpt):
    huge = 2**58
    _rewrite_entry(ckpt, "weights", shape=[huge], size=huge * 4)
    r = reader.CheckpointReader(ckpt)
    assert r.get_variable_to_shape_map()["weights"] == [huge]
    with pytest.raises(CorruptCheckpointError, match="beyond the file"):
        r.get_tensor("weights")


@pytest.mark.parametrize("changes, message", [
    ({"shard_id": 3}, "shard id 3"),
    ({"offset": -5}, "negative offset"),
    ({"shape": [-1, 4]}, "invalid shape"),
    ({"shape": [1] * 65}, "rank 65"),
])
def test_invalid_entry_fields(ckpt, changes, message):
    _rewrite_entry(ckpt, "weights", **changes)
    with pytest.raises(CorruptCheckpointError, match=f"'weights'.*{message}"):
        reader.CheckpointReader(ckpt)


def test_unparseable_entry_proto(ckpt):
    items = dict(table.Table(open(_index(ckpt), "rb").read(), "x").items())
    items[b"weights"] = b"\x0a\xff\xff"  # length-delimited field running past the end
    open(_index(ckpt), "wb").write(table.build_table(sorted(items.items())))
    with pytest.raises(CorruptCheckpointError, match=r"m\.index: cannot parse tensor 'weights'"):
        reader.CheckpointReader(ckpt)


def _write_with_header(prefix, header: BundleHeaderProto, include=True):
    items = dict(table.Table(open(_index(prefix), "rb").read(), "x").items())
    if include:
        items[b""] = header.SerializeToString()
    else:
        del items[b""]
    open(_index(prefix), "wb").write(table.build_table(sorted(items.items())))


def test_missing_header(ckpt):
    _write_with_header(ckpt, BundleHeaderProto(), include=False)
    with pytest.raises(CorruptCheckpointError, match="no bundle header"):
        reader.CheckpointReader(ckpt)


@pytest.mark.parametrize("version", [{"min_consumer": 2}, {"producer": -1}, {"producer": 1, "bad_consumers": [1]}])
def test_unsupported_versions(ckpt, version):
    header = BundleHeaderProto(num_shards=1)
    header.version.MergeFrom(type(header.version)(**version))
    _write_with_header(ckpt, header)
    with pytest.raises(UnsupportedVersionError, match=r"m\.index"):
        reader.CheckpointReader(ckpt)


def test_header_without_version_is_accepted_like_tensorflow(ckpt):
    _write_with_header(ckpt, BundleHeaderProto(num_shards=1))
    assert reader.CheckpointReader(ckpt).get_tensor("weights")[999] == 999


def test_big_endian_header_is_refused(ckpt):
    _write_with_header(ckpt, BundleHeaderProto(num_shards=1, endianness=BundleHeaderProto.BIG))
    with pytest.raises(UnsupportedVersionError, match="big-endian"):
        reader.CheckpointReader(ckpt)


def test_errors_pickle_with_their_message(ckpt):
    import pickle

    _flip(_data(ckpt), 10)
    with pytest.raises(CRCMismatchError) as info:
        reader.CheckpointReader(ckpt).get_tensor("weights")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is CRCMismatchError and str(copy) == str(info.value)


def test_works_on_memory_filesystem_too(memory_root):
    prefix = writer.write_checkpoint(memory_root + "/m", {"a": np.ones(10, np.int16)})
    storage, _ = Storage.for_path(prefix)
    data = bytearray(storage.read_bytes(bundle.data_filename(prefix, 0, 1)))
    data[3] ^= 1
    storage.write_bytes(bundle.data_filename(prefix, 0, 1), bytes(data))
    with pytest.raises(CRCMismatchError, match=r"memory://.*m\.data-00000-of-00001: tensor 'a'"):
        reader.CheckpointReader(prefix).get_tensor("a")


def _variant_bytes(elements):
    """DT_VARIANT layout as TF writes it (reference 5.3); checked against a TF iterator checkpoint."""
    from orchestrator.checkpoint import coding, crc

    out, running = b"", 0
    for element in elements:
        running = crc.extend(crc.extend(running, len(element).to_bytes(8, "little")), element)
        stored = coding.encode_fixed32(crc.mask(running))
        running = crc.extend(running, stored)
        out += coding.encode_varint(len(element)) + element + stored
    return out, crc.mask(running)


def _variant_checkpoint(tmp_path, elements):
    storage, prefix = Storage.for_path(str(tmp_path / "v"))
    data, masked = _variant_bytes(elements)
    storage.write_bytes(bundle.data_filename(prefix, 0, 1), data)
    entry = bundle.make_entry(21, (len(elements),), size=len(data), masked_crc=masked)
    index = bundle.build_index_bytes({"it/ITERATOR_STATE": entry.SerializeToString()}, 1)
    storage.write_bytes(prefix + ".index", index)
    return prefix


def test_variant_tensors_read_as_raw_bytes_and_are_verified(tmp_path):
    elements = [b"\x0a\x03abc", b"", b"\x00" * 300]
    prefix = _variant_checkpoint(tmp_path, elements)
    r = reader.CheckpointReader(prefix)
    assert r.get_variable_to_dtype_map() == {"it/ITERATOR_STATE": np.dtype(object)}
    assert r.get_tensor("it/ITERATOR_STATE").tolist() == elements
    r.verify()
    _flip(_data(prefix), 12)  # the CRC of element 1 (element 0 is bytes 0..9)
    with pytest.raises(CRCMismatchError, match="'it/ITERATOR_STATE'.*variant element 1"):
        r.get_tensor("it/ITERATOR_STATE")

"""The LevelDB-style index table: byte-identical to TensorFlow's, and strict when reading."""

import pytest

from orchestrator.checkpoint import coding, table
from orchestrator.checkpoint.errors import CorruptCheckpointError, CRCMismatchError

HEADER = bytes.fromhex("08011a020801")
ENTRY_X = bytes.fromhex("0801120412020802280835593ce535")
# Reference 3.5: TF 2.21's `x.index` for SaveV2(prefix="x", names=["x"], float32 [1, 2]).
TF_X_INDEX = bytes.fromhex(
    "000006" "08011a020801"
    "00010f" "78" "0801120412020802280835593ce535"
    "00000000" "01000000"
    "0091364233"
    "0000000001000000" "00c0f2a1b0"
    "000102" "79" "0024" "0000000001000000"
    "0008121017"
    "2908360e" + "00" * 36 + "57fb808b247547db"
)


def test_reference_test_vector_is_byte_identical():
    built = table.build_table([(b"", HEADER), (b"x", ENTRY_X)])
    assert len(built) == 121
    assert built == TF_X_INDEX


def test_reference_test_vector_parses():
    parsed = table.Table(TF_X_INDEX, "x.index")
    assert list(parsed.items()) == [(b"", HEADER), (b"x", ENTRY_X)]
    assert parsed.get(b"x") == ENTRY_X
    assert parsed.get(b"w") is None and parsed.get(b"z") is None


@pytest.mark.parametrize("start, limit, expected", [
    (b"abc", b"abe", b"abd"),          # increment the first differing byte
    (b"abc", b"abd", b"abc"),          # +1 would not be < limit: keep start
    (b"ab", b"abc", b"ab"),            # prefix: keep start
    (b"layer_03496/x", b"layer_03497/y", b"layer_03496/x"),
    (b"a\xffz", b"b", b"a\xffz"),     # 'a'+1 == 'b', not smaller
    (b"a", b"c", b"b"),
])
def test_shortest_separator(start, limit, expected):
    sep = table.shortest_separator(start, limit)
    assert sep == expected
    assert start <= sep < limit


@pytest.mark.parametrize("key, expected", [
    (b"x", b"y"), (b"save_counter/.ATTRIBUTES", b"t"), (b"\xff\xffa", b"\xff\xffb"), (b"\xff\xff", b"\xff\xff"),
])
def test_short_successor(key, expected):
    assert table.short_successor(key) == expected


def test_empty_table_has_empty_blocks_and_reads_back_empty():
    built = table.build_table([])
    assert built[:13] == bytes.fromhex("0000000001000000" "00c0f2a1b0")
    assert list(table.Table(built, "e.index").items()) == []


def _many_entries(n, value_size=120):
    return [(f"layer_{i:05d}/kernel".encode(), bytes([i % 251]) * value_size) for i in range(n)]


def test_multi_block_table_round_trips_and_uses_separators():
    entries = _many_entries(6000)
    built = table.build_table(entries)
    parsed = table.Table(built, "big.index")
    assert len(parsed._handles) >= 3  # > 256 KiB of entries: several data blocks
    assert list(parsed.items()) == entries
    for key, value in entries[::997]:
        assert parsed.get(key) == value
    assert parsed.get(b"layer_99999") is None
    # index keys are separators: every block's last key <= separator < next block's first key
    assert all(len(k) <= len(b"layer_00000/kernel") for k in parsed._index_keys)


def test_entry_of_twice_the_block_size_flushes_the_current_block_first():
    big = b"v" * (2 * table.BLOCK_SIZE)
    entries = [(b"a", b"1"), (b"b", big), (b"c", b"3")]
    parsed = table.Table(table.build_table(entries), "huge.index")
    assert list(parsed.items()) == entries
    assert len(parsed._handles) == 3  # [a] flushed before b; b alone is over the block size


def test_restart_points_every_16_entries_in_data_blocks():
    block = table.BlockBuilder(table.DATA_RESTART_INTERVAL)
    for i in range(40):
        block.add(f"key{i:03d}".encode(), b"v")
    contents = block.finish()
    assert coding.decode_fixed32(contents, len(contents) - 4) == 3  # restarts at entries 0, 16, 32


def test_builder_rejects_unsorted_or_duplicate_keys():
    builder = table.TableBuilder()
    builder.add(b"b", b"")
    with pytest.raises(ValueError):
        builder.add(b"a", b"")
    with pytest.raises(ValueError):
        builder.add(b"b", b"")


def test_short_file_and_wrong_magic_are_rejected_naming_the_file():
    with pytest.raises(CorruptCheckpointError, match=r"x\.index.*shorter than the footer"):
        table.Table(TF_X_INDEX[:47], "x.index")
    bad_magic = TF_X_INDEX[:-1] + b"\x00"
    with pytest.raises(CorruptCheckpointError, match=r"x\.index.*magic"):
        table.Table(bad_magic, "x.index")


def test_block_crc_mismatch_is_detected_in_data_and_index_blocks():
    data_flip = bytearray(TF_X_INDEX)
    data_flip[10] ^= 0x01
    with pytest.raises(CRCMismatchError, match=r"x\.index.*data block 0"):
        list(table.Table(bytes(data_flip), "x.index").items())
    index_flip = bytearray(TF_X_INDEX)
    index_flip[0x38] ^= 0x01
    with pytest.raises(CRCMismatchError, match=r"x\.index.*index block"):
        table.Table(bytes(index_flip), "x.index")


def test_block_handle_beyond_the_file_is_rejected():
    footer = table.BlockHandle(41, 8).encode() + table.BlockHandle(54, 10**12).encode()
    forged = TF_X_INDEX[:-48] + footer + bytes(40 - len(footer)) + TF_X_INDEX[-8:]
    with pytest.raises(CorruptCheckpointError, match="beyond the file"):
        table.Table(forged, "x.index")

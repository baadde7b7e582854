"""Byte counts read the same in `inspect`, `ls`, `export` and the training log."""

import pytest

from orchestrator.units import human_bytes


@pytest.mark.parametrize("n, shown", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (200 * 2**20, "200.0 MiB"),
    (3 * 2**30, "3.0 GiB"), (5 * 2**40, "5.0 TiB"), (2**60, "1048576.0 TiB"),
])
def test_binary_units(n, shown):
    assert human_bytes(n) == shown

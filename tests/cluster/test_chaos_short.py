"""The chaos test (scripts/chaos.py) end to end: random real faults, job survives.

Short version (4 faults: every kind once) in the default suite; the long one (50 faults,
kinds mixed at random) is marked slow.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _row(table: str, name: str) -> str:
    match = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", table, re.MULTILINE)
    assert match, f"no row {name!r} in\n{table}"
    return match.group(1)


def run_chaos(tmp_path: Path, faults: int, timeout: float) -> str:
    table = tmp_path / "chaos.md"
    proc = subprocess.run([sys.executable, "scripts/chaos.py", "--faults", str(faults),
                           "--seed", "1", "--workdir", str(tmp_path / "work"),
                           "--markdown", str(table)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return table.read_text()


def _check(table: str, faults: int) -> None:
    assert _row(table, "faults injected") == str(faults)
    assert _row(table, "faults recovered") == str(faults)
    for kind in ("kill_worker", "remove_node", "sigterm_driver", "fail_shard_write"):
        recovered, injected = _row(table, f"  {kind}").split("/")
        assert int(injected) >= 1 and recovered == injected
    assert _row(table, "job finished") == "yes"
    assert _row(table, "final state bit-identical to uninterrupted run") == "yes"
    assert _row(table, "recovery median").endswith(" s")


@pytest.mark.timeout(600)
def test_chaos_short_every_fault_recovered_and_state_identical(tmp_path):
    _check(run_chaos(tmp_path, faults=4, timeout=580), faults=4)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_chaos_long(tmp_path):
    _check(run_chaos(tmp_path, faults=50, timeout=3500), faults=50)

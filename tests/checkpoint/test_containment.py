"""Containment: nothing outside the checkpoint directory is read, fetched or deleted because a file said so."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from orchestrator.checkpoint import state, writer
from orchestrator.checkpoint.containment import is_inside, resolve_inside
from orchestrator.checkpoint.manager import CheckpointManager


@pytest.mark.parametrize("entry, expected", [
    ("model.ckpt-1", "/d/ckpt/model.ckpt-1"),
    ("/d/ckpt/model.ckpt-1", "/d/ckpt/model.ckpt-1"),
    ("file:///d/ckpt/model.ckpt-1", "/d/ckpt/model.ckpt-1"),
    ("sub/model.ckpt-1", "/d/ckpt/sub/model.ckpt-1"),
    ("../victim/users", None),
    ("sub/../../x", None),
    ("/abs/path/x", None),
    ("/d/ckpt", None),
    ("/d/ckpt-other/model.ckpt-1", None),
    ("http://127.0.0.1:9/model.ckpt-1", None),
    ("s3://someone-elses-bucket/model.ckpt-1", None),
    ("file:///etc/passwd", None),
    ("", None),
])
def test_local_directory(entry, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_inside("/d/ckpt", entry, "/d/ckpt/checkpoint") == expected
    if expected is None:  # every refusal is named, with the file that named it
        assert len(caught) == 1 and repr(entry) in str(caught[0].message)
        assert "/d/ckpt/checkpoint" in str(caught[0].message)
    else:
        assert not caught


@pytest.mark.parametrize("entry, expected", [
    ("model.ckpt-1", "s3://b/ckpt/model.ckpt-1"),
    ("s3://b/ckpt/model.ckpt-1", "s3://b/ckpt/model.ckpt-1"),
    ("s3://b/other/model.ckpt-1", None),
    ("s3://someone-elses-bucket/ckpt/model.ckpt-1", None),
    ("gs://b/ckpt/model.ckpt-1", None),
    ("/b/ckpt/model.ckpt-1", None),
    ("../ckpt2/model.ckpt-1", None),
])
def test_bucket_directory(entry, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve_inside("s3://b/ckpt", entry, "s3://b/ckpt/checkpoint") == expected


def test_symlinked_directory_accepts_its_real_path(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert is_inside(str(tmp_path / "link"), str(real / "model.ckpt-1"))
    assert not is_inside(str(tmp_path / "link"), str(tmp_path / "model.ckpt-1"))


def _commit(prefix: str) -> None:
    writer.write_checkpoint(prefix, {"v": np.arange(4, dtype=np.float32)})


def _victims(tmp_path):
    """Committed checkpoints outside the directory under test, as an attacker would point at."""
    victim = tmp_path / "victim"
    victim.mkdir()
    _commit(str(victim / "users"))
    _commit(str(tmp_path / "abs-x"))
    return sorted(p for p in tmp_path.rglob("*") if p.is_file() and "ckpt" not in p.parts)


def _still_there(paths) -> bool:
    return all(p.exists() for p in paths)


def test_sidecar_pending_deletions_outside_are_ignored(tmp_path):
    """Issue 14 item 1: constructing a manager deleted ../victim/users.* and /abs/path/x.*."""
    victims = _victims(tmp_path)
    directory = tmp_path / "ckpt"
    manager = CheckpointManager(str(directory))
    manager.save({"v": np.zeros(3, np.float32)}, 1)
    sidecar = directory / "checkpoint.manager.json"
    data = json.loads(sidecar.read_text())
    data["pending_deletions"] = ["../victim/users", str(tmp_path / "abs-x")]
    data["preserved"] = ["../victim/users"]
    sidecar.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning) as caught:
        again = CheckpointManager(str(directory), max_to_keep=1)
        again.save({"v": np.ones(3, np.float32)}, 2)
    messages = "\n".join(str(w.message) for w in caught)
    assert "'../victim/users'" in messages and repr(str(tmp_path / "abs-x")) in messages
    assert _still_there(victims)
    assert again.checkpoints == [str(directory / "model.ckpt-2")] and again.preserved_checkpoints == []


def test_state_file_entries_outside_are_never_deleted(tmp_path):
    """Issue 14 item 2: a state file listing other directories' checkpoints, then max_to_keep=1."""
    victims = _victims(tmp_path)
    directory = tmp_path / "ckpt"
    CheckpointManager(str(directory)).save({"v": np.zeros(3, np.float32)}, 5)
    (directory / "checkpoint").write_text(
        f'model_checkpoint_path: "model.ckpt-5"\n'
        f'all_model_checkpoint_paths: "{tmp_path / "abs-x"}"\n'
        f'all_model_checkpoint_paths: "../victim/users"\n'
        f'all_model_checkpoint_paths: "model.ckpt-5"\n')
    with pytest.warns(RuntimeWarning, match="victim/users"):
        manager = CheckpointManager(str(directory), max_to_keep=1)
    manager.save({"v": np.ones(3, np.float32)}, 6)
    manager.save({"v": np.ones(3, np.float32)}, 7)
    assert _still_there(victims)
    assert manager.checkpoints == [str(directory / "model.ckpt-7")]
    assert not (directory / "model.ckpt-5.index").exists()  # retention inside still works


def test_latest_in_another_bucket_falls_back_to_the_local_checkpoint(tmp_path):
    """Issue 14 item 6: an s3:// entry in a local state file is never contacted; the local one is used."""
    directory = tmp_path / "ckpt"
    manager = CheckpointManager(str(directory))
    manager.save({"v": np.zeros(3, np.float32)}, 5)
    (directory / "checkpoint").write_text(
        'model_checkpoint_path: "s3://someone-elses-bucket/model.ckpt-9"\n'
        'all_model_checkpoint_paths: "model.ckpt-5"\n'
        'all_model_checkpoint_paths: "s3://someone-elses-bucket/model.ckpt-9"\n')
    with pytest.warns(RuntimeWarning, match="someone-elses-bucket"):
        assert state.latest_checkpoint(str(directory)) == str(directory / "model.ckpt-5")
        again = CheckpointManager(str(directory))
    assert again.restore_or_initialize() == str(directory / "model.ckpt-5")


def test_state_file_entries_through_a_symlinked_subdirectory_are_never_deleted(tmp_path):
    """'sub/model.ckpt-1' is inside on the text, but 'sub' is a symlink to another directory:
    retention deleted the other directory's checkpoint through it."""
    victims = _victims(tmp_path)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "sub").symlink_to(tmp_path / "victim")
    (directory / "checkpoint").write_text(
        'model_checkpoint_path: "sub/users"\nall_model_checkpoint_paths: "sub/users"\n'
        'all_model_checkpoint_timestamps: 1.0\nlast_preserved_timestamp: 0.5\n')
    with pytest.warns(RuntimeWarning, match="'sub/users'.*symlink"):
        assert state.latest_checkpoint(str(directory)) is None
    with pytest.warns(RuntimeWarning, match="'sub/users'"):
        manager = CheckpointManager(str(directory), max_to_keep=1)
        manager.save({"v": np.ones(3, np.float32)}, 2)
        manager.save({"v": np.ones(3, np.float32)}, 3)
    assert _still_there(victims)
    assert manager.checkpoints == [str(directory / "model.ckpt-3")]


def test_symlinked_subdirectory_inside_the_directory_is_still_inside(tmp_path):
    directory = tmp_path / "ckpt"
    (directory / "real").mkdir(parents=True)
    (directory / "alias").symlink_to(directory / "real")
    assert resolve_inside(str(directory), "alias/model.ckpt-1", "test") == str(directory / "alias/model.ckpt-1")

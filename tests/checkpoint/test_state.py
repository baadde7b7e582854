"""The `checkpoint` state file: TF text format, relative paths, atomic replace."""

import os

import numpy as np
import pytest

from orchestrator.checkpoint import reader, state, writer
from orchestrator.checkpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from orchestrator.checkpoint.errors import InvalidCheckpointWriteError
from orchestrator.checkpoint.storage import Storage

MANAGER_WRITTEN = """model_checkpoint_path: "ckpt-4"
all_model_checkpoint_paths: "ckpt-3"
all_model_checkpoint_paths: "ckpt-4"
all_model_checkpoint_timestamps: 1795369331.903781
all_model_checkpoint_timestamps: 1795369331.9125507
last_preserved_timestamp: 1795369330.834732
"""


def test_reads_what_tensorflow_checkpoint_manager_writes(tmp_path):
    (tmp_path / "checkpoint").write_text(MANAGER_WRITTEN)
    got = state.get_checkpoint_state(str(tmp_path))
    assert got.model_checkpoint_path == str(tmp_path / "ckpt-4")
    assert got.all_model_checkpoint_paths == [str(tmp_path / "ckpt-3"), str(tmp_path / "ckpt-4")]
    assert got.all_model_checkpoint_timestamps == [1795369331.903781, 1795369331.9125507]
    assert got.last_preserved_timestamp == 1795369330.834732


def test_absolute_paths_inside_are_kept_and_timestamps_optional(tmp_path):
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{tmp_path}/model.ckpt-9"\n')
    got = state.get_checkpoint_state(str(tmp_path))
    assert got.model_checkpoint_path == str(tmp_path / "model.ckpt-9")
    assert got.all_model_checkpoint_paths == [] and got.all_model_checkpoint_timestamps == []


def test_paths_outside_the_directory_are_dropped_with_a_warning(tmp_path):
    """A state file cannot point us elsewhere (issue 14 items 2, 6): the entry is named, then ignored."""
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "http://127.0.0.1:9/x/model.ckpt-9"\n'
        'all_model_checkpoint_paths: "/elsewhere/model.ckpt-7"\n'
        'all_model_checkpoint_paths: "model.ckpt-8"\n'
        'all_model_checkpoint_paths: "http://127.0.0.1:9/x/model.ckpt-9"\n'
        'all_model_checkpoint_timestamps: 7.0\nall_model_checkpoint_timestamps: 8.0\n'
        'all_model_checkpoint_timestamps: 9.0\n')
    with pytest.warns(RuntimeWarning) as caught:
        got = state.get_checkpoint_state(str(tmp_path))
    text = "\n".join(str(w.message) for w in caught)
    assert "'/elsewhere/model.ckpt-7'" in text and "'http://127.0.0.1:9/x/model.ckpt-9'" in text
    assert got.all_model_checkpoint_paths == [str(tmp_path / "model.ckpt-8")]
    assert got.model_checkpoint_path == str(tmp_path / "model.ckpt-8")  # the newest one left
    assert got.all_model_checkpoint_timestamps == [8.0]
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "../victim/model.ckpt-1"\n')
    with pytest.warns(RuntimeWarning, match=r"'\.\./victim/model.ckpt-1'"):
        assert state.get_checkpoint_state(str(tmp_path)) is None


def test_no_state_file_means_none(tmp_path):
    assert state.get_checkpoint_state(str(tmp_path)) is None
    assert state.latest_checkpoint(str(tmp_path)) is None


def test_a_file_given_as_the_directory_has_no_state_like_tensorflow(tmp_path):
    # tf.train.latest_checkpoint / get_checkpoint_state return None for a path that is a file
    (tmp_path / "model.ckpt-1.index").write_bytes(b"not a directory")
    assert state.get_checkpoint_state(str(tmp_path / "model.ckpt-1.index")) is None
    assert state.latest_checkpoint(str(tmp_path / "model.ckpt-1.index")) is None


@pytest.mark.parametrize("text", ['model_checkpoint_path: "unterminated\n', "bogus_field: 1\n", "\xff\xfe", ""])
def test_unparseable_or_empty_state_names_the_file(tmp_path, text):
    (tmp_path / "checkpoint").write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint"):
        state.get_checkpoint_state(str(tmp_path))
    assert str(tmp_path / "checkpoint") in _message(tmp_path)


def _message(tmp_path):
    try:
        state.get_checkpoint_state(str(tmp_path))
    except CorruptCheckpointError as exc:
        return str(exc)
    return ""


def test_update_writes_relative_paths_with_timestamps(tmp_path):
    d = str(tmp_path)
    state.update_checkpoint_state(d, f"{d}/ckpt-2", [f"{d}/ckpt-1"], [10.5, 20.25], last_preserved_timestamp=5.0)
    assert (tmp_path / "checkpoint").read_text() == (
        'model_checkpoint_path: "ckpt-2"\n'
        'all_model_checkpoint_paths: "ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-2"\n'
        "all_model_checkpoint_timestamps: 10.5\n"
        "all_model_checkpoint_timestamps: 20.25\n"
        "last_preserved_timestamp: 5.0\n")
    got = state.get_checkpoint_state(d)
    assert got.all_model_checkpoint_paths == [f"{d}/ckpt-1", f"{d}/ckpt-2"]
    assert sorted(os.listdir(d)) == ["checkpoint"]  # no temp files left behind


def test_update_can_keep_absolute_paths_and_custom_filename(tmp_path):
    d = str(tmp_path)
    state.update_checkpoint_state(d, f"{d}/m-1", latest_filename="latest", save_relative_paths=False)
    assert (tmp_path / "latest").read_text() == (
        f'model_checkpoint_path: "{d}/m-1"\nall_model_checkpoint_paths: "{d}/m-1"\n')
    assert state.get_checkpoint_state(d, latest_filename="latest").model_checkpoint_path == f"{d}/m-1"


def test_update_validates_arguments(tmp_path):
    d = str(tmp_path)
    with pytest.raises(InvalidCheckpointWriteError, match="2 timestamps for 1"):
        state.update_checkpoint_state(d, f"{d}/m", all_model_checkpoint_timestamps=[1.0, 2.0])
    with pytest.raises(InvalidCheckpointWriteError, match="conflicts"):
        state.update_checkpoint_state(d, f"{d}/checkpoint")


def test_update_replaces_the_previous_state(tmp_path):
    d = str(tmp_path)
    state.update_checkpoint_state(d, f"{d}/a")
    state.update_checkpoint_state(d, f"{d}/b", [f"{d}/a", f"{d}/b"])
    assert state.get_checkpoint_state(d).all_model_checkpoint_paths == [f"{d}/a", f"{d}/b"]


def test_latest_checkpoint_requires_the_index(tmp_path):
    d = str(tmp_path)
    state.update_checkpoint_state(d, f"{d}/m-1")
    assert state.latest_checkpoint(d) is None
    writer.write_checkpoint(f"{d}/m-1", {"a": np.ones(2)})
    assert state.latest_checkpoint(d) == f"{d}/m-1"


def test_load_checkpoint_of_a_directory_uses_the_latest(tmp_path):
    d = str(tmp_path)
    writer.write_checkpoint(f"{d}/m-1", {"v": np.int64(1)})
    writer.write_checkpoint(f"{d}/m-2", {"v": np.int64(2)})
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint found"):
        reader.load_checkpoint(d)
    state.update_checkpoint_state(d, f"{d}/m-2", [f"{d}/m-1"])
    assert reader.load_checkpoint(d).get_tensor("v") == 2
    assert reader.list_variables(d) == [("v", [])]


def test_state_on_memory_filesystem(memory_root):
    writer.write_checkpoint(f"{memory_root}/run/m-3", {"x": np.zeros(3)})
    state.update_checkpoint_state(f"{memory_root}/run", f"{memory_root}/run/m-3")
    storage, _ = Storage.for_path(memory_root)
    assert storage.read_bytes(f"{memory_root}/run/checkpoint").startswith(b'model_checkpoint_path: "m-3"')
    assert state.latest_checkpoint(f"{memory_root}/run") == f"{memory_root}/run/m-3"
    assert reader.load_checkpoint(f"{memory_root}/run").get_tensor("x").tolist() == [0.0, 0.0, 0.0]


def test_relative_directory_and_paths_are_resolved_like_tensorflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writer.write_checkpoint("run/m-1", {"a": np.ones(1)})
    state.update_checkpoint_state("run", "run/m-1")
    assert (tmp_path / "run" / "checkpoint").read_text().startswith('model_checkpoint_path: "m-1"')
    assert state.latest_checkpoint("run") == str(tmp_path / "run" / "m-1")
    state.update_checkpoint_state("run", "run/m-1", save_relative_paths=False)
    assert state.get_checkpoint_state("run").model_checkpoint_path == str(tmp_path / "run" / "m-1")
    state.update_checkpoint_state("run", str(tmp_path / "elsewhere" / "m-9"))
    assert 'model_checkpoint_path: "../elsewhere/m-9"' in (tmp_path / "run" / "checkpoint").read_text()


def test_relative_paths_under_an_absolute_directory_are_kept(tmp_path):
    d = str(tmp_path)
    state.update_checkpoint_state(d, "ckpt-3", ["ckpt-2"], save_relative_paths=True)
    assert (tmp_path / "checkpoint").read_text().startswith('model_checkpoint_path: "ckpt-3"\n')
    assert state.get_checkpoint_state(d).all_model_checkpoint_paths == [f"{d}/ckpt-2", f"{d}/ckpt-3"]

"""Saver: TF1 ``tf.train.Saver`` semantics on real files (local, memory, S3)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from orchestrator.checkpoint import bundle, reader, state, table
from orchestrator.checkpoint.protos import BundleEntryProto
from orchestrator.checkpoint.errors import CheckpointNotFoundError, InvalidCheckpointWriteError, UnsupportedDtypeError
from orchestrator.checkpoint.writer import write_checkpoint
from orchestrator.checkpoint.saver import RestoreMismatchError, Saver
from orchestrator.checkpoint.variables import Variable


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def mlp_variables(layers: int, width: int = 4, seed: int = 0) -> list[Variable]:
    """TF-named dense layers: dense/kernel, dense/bias, dense_1/kernel, ..."""
    rng = np.random.default_rng(seed)
    variables = []
    for i in range(layers):
        scope = "dense" if i == 0 else f"dense_{i}"
        variables.append(Variable(f"{scope}/kernel", rng.standard_normal((width, width)).astype(np.float32)))
        variables.append(Variable(f"{scope}/bias", rng.standard_normal(width).astype(np.float32)))
    return variables


def snapshot(variables):
    return {v.name: v.numpy().copy() for v in variables}


def test_list_var_list_saves_under_variable_names(tmp_path):
    v1 = Variable("variable_1", np.array(1.0, np.float32))
    v2 = Variable("variable_2", np.array(2.0, np.float32))
    prefix = Saver([v1, v2]).save(str(tmp_path / "model.ckpt"))
    ckpt = reader.CheckpointReader(prefix)
    assert ckpt.keys() == ["variable_1", "variable_2"]
    assert ckpt.get_tensor("variable_1") == 1.0 and ckpt.get_tensor("variable_2") == 2.0


def test_dict_var_list_saves_under_keys(tmp_path):
    w = Variable("dense/kernel", np.arange(6, dtype=np.float64).reshape(2, 3))
    prefix = Saver({"renamed/w": w}).save(str(tmp_path / "model.ckpt"))
    ckpt = reader.CheckpointReader(prefix)
    assert ckpt.keys() == ["renamed/w"]
    np.testing.assert_array_equal(ckpt.get_tensor("renamed/w"), w.numpy())


def test_swapped_dict_restores_two_point_oh_one_point_oh(tmp_path):
    v1 = Variable("variable_1", np.array(1.0, np.float32))
    v2 = Variable("variable_2", np.array(2.0, np.float32))
    prefix = Saver([v1, v2]).save(str(tmp_path / "model.ckpt"))
    Saver({"variable_1": v2, "variable_2": v1}).restore(prefix)
    assert f"{float(v1.numpy())} {float(v2.numpy())}" == "2.0 1.0"


def test_subset_restore_leaves_other_variables_as_initialized(tmp_path):
    saved = mlp_variables(2, seed=1)
    prefix = Saver(saved).save(str(tmp_path / "model.ckpt"))
    fresh = mlp_variables(2, seed=2)
    before = snapshot(fresh)
    Saver([fresh[0]]).restore(prefix)  # dense/kernel only
    np.testing.assert_array_equal(fresh[0].numpy(), saved[0].numpy())
    for var in fresh[1:]:
        np.testing.assert_array_equal(var.numpy(), before[var.name])


def test_warm_start_six_layers_from_five_layer_checkpoint(tmp_path):
    five = mlp_variables(5, seed=1)
    prefix = Saver(five).save(str(tmp_path / "five.ckpt"))
    six = mlp_variables(6, seed=2)
    init_last = snapshot(six[10:])
    Saver(six[:10]).restore(prefix)
    for old, new in zip(five, six[:10]):
        assert old.name == new.name
        np.testing.assert_array_equal(new.numpy(), old.numpy())
    for var in six[10:]:
        np.testing.assert_array_equal(var.numpy(), init_last[var.name])


def test_restoring_all_six_layers_fails_naming_missing_ones_and_assigns_nothing(tmp_path):
    prefix = Saver(mlp_variables(5, seed=1)).save(str(tmp_path / "five.ckpt"))
    six = mlp_variables(6, seed=2)
    before = snapshot(six)
    with pytest.raises(RestoreMismatchError) as info:
        Saver(six).restore(prefix)
    message = str(info.value)
    assert "'dense_5/kernel'" in message and "'dense_5/bias'" in message
    assert "close matches: 'dense_4/kernel'" in message or "'dense_4/kernel'" in message
    assert prefix in message
    for var in six:
        np.testing.assert_array_equal(var.numpy(), before[var.name])


def test_mismatch_error_lists_every_shape_and_dtype_problem_before_assigning(tmp_path):
    saved = [Variable("dense/kernel", np.zeros((3, 4), np.float32)), Variable("dense/bias", np.zeros(4, np.float32)),
             Variable("step", np.zeros(2, np.int64))]
    prefix = Saver(saved).save(str(tmp_path / "m.ckpt"))
    targets = [Variable("dense/kernel", np.ones((4, 4), np.float32)), Variable("dense/bias", np.ones(4, np.float64)),
               Variable("step", np.ones(2, np.int64)), Variable("dense/kernels", np.ones(2, np.float32))]
    with pytest.raises(RestoreMismatchError) as info:
        Saver(targets).restore(prefix)
    message = str(info.value)
    assert "3 variable(s)" in message
    assert "'dense/kernel': checkpoint (3, 4) vs variable 'dense/kernel' (4, 4)" in message
    assert "'dense/bias': checkpoint float32 vs variable 'dense/bias' float64" in message
    assert "missing in checkpoint: 'dense/kernels'" in message
    assert "close matches: 'dense/kernel' (3, 4)" in message
    assert all(np.all(v.numpy() == 1) for v in targets)  # 'step' matched but was not assigned either


def test_global_step_suffix_int_and_variable(tmp_path):
    var = Variable("x", np.arange(3, dtype=np.int32))
    saver = Saver([var])
    prefix = saver.save(str(tmp_path / "model.ckpt"), global_step=1000)
    assert prefix == str(tmp_path / "model.ckpt-1000")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "model.ckpt-1000.data-00000-of-00001",
                                            "model.ckpt-1000.index"]
    step = Variable("global_step", np.array(2000, np.int64), trainable=False)
    assert saver.save(str(tmp_path / "model.ckpt"), global_step=step).endswith("model.ckpt-2000")
    assert state.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-2000")


def test_var_list_none_and_duplicates_are_rejected():
    with pytest.raises(ValueError, match=r"Saver needs var_list: .*Saver\(model.variables\).*\{checkpoint key: Variable\}"):
        Saver()  # says what to pass
    with pytest.raises(ValueError, match="same key 'a'"):
        Saver([Variable("a", np.zeros(1)), Variable("a", np.ones(1))])
    with pytest.raises(TypeError, match="expected a Variable"):
        Saver({"a": np.zeros(1)})


def test_max_to_keep_five_leaves_the_five_newest(tmp_path):
    var = Variable("x", np.zeros(2, np.float32))
    saver = Saver([var], max_to_keep=5)
    for step in range(1, 9):
        var.assign(np.full(2, step, np.float32))
        saver.save(str(tmp_path / "model.ckpt"), global_step=step)
    indexes = sorted(f for f in os.listdir(tmp_path) if f.endswith(".index"))
    assert indexes == [f"model.ckpt-{s}.index" for s in range(4, 9)]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("model.ckpt-1.", "model.ckpt-2."))]
    current = state.get_checkpoint_state(str(tmp_path))
    assert current.all_model_checkpoint_paths == [str(tmp_path / f"model.ckpt-{s}") for s in range(4, 9)]
    assert saver.last_checkpoints == current.all_model_checkpoint_paths


def test_keep_every_n_hours_preserves_checkpoints_forever(tmp_path):
    clock = Clock(0.0)
    var = Variable("x", np.zeros(1, np.float32))
    saver = Saver([var], max_to_keep=2, keep_checkpoint_every_n_hours=1.0, clock=clock)
    for step in range(10):  # one save every 30 minutes
        clock.now = step * 1800.0
        saver.save(str(tmp_path / "model.ckpt"), global_step=step)
    steps = sorted(int(f.split("-")[1].split(".")[0]) for f in os.listdir(tmp_path) if f.endswith(".index"))
    # the 2 newest, plus the expired ones saved after each next_checkpoint_time (1 h, 2 h, 3 h)
    assert steps == [3, 5, 7, 8, 9]
    assert len(saver.last_checkpoints) == 2


def test_sharded_save_round_trips_every_value(tmp_path):
    variables = mlp_variables(3, width=8, seed=3)
    prefix = Saver(variables, num_shards=3).save(str(tmp_path / "model.ckpt"), global_step=7)
    data = sorted(f for f in os.listdir(tmp_path) if ".data-" in f)
    assert data == [f"model.ckpt-7.data-0000{i}-of-00003" for i in range(3)]
    fresh = mlp_variables(3, width=8, seed=4)
    Saver(fresh).restore(prefix)
    for old, new in zip(variables, fresh):
        np.testing.assert_array_equal(new.numpy(), old.numpy())


def test_restore_of_missing_checkpoint_names_the_prefix(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nothing-here"):
        Saver([Variable("x", np.zeros(1))]).restore(str(tmp_path / "nothing-here"))


def test_save_and_restore_on_every_backend(any_root):
    root, options = any_root
    variables = mlp_variables(2, seed=5)
    saver = Saver(variables, storage_options=options, num_shards=2)
    prefix = saver.save(root + "/model.ckpt", global_step=3)
    assert state.latest_checkpoint(root, storage_options=options) == prefix
    fresh = mlp_variables(2, seed=6)
    Saver(fresh, storage_options=options).restore(prefix)
    for old, new in zip(variables, fresh):
        np.testing.assert_array_equal(new.numpy(), old.numpy())


def test_recover_last_checkpoints_after_restart_resumes_retention(tmp_path):
    var = Variable("x", np.zeros(1, np.float32))
    first = Saver([var], max_to_keep=3)
    for step in range(3):
        first.save(str(tmp_path / "model.ckpt"), global_step=step)
    second = Saver([var], max_to_keep=3)  # a new process forgets; TF's recover_last_checkpoints
    second.recover_last_checkpoints(state.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths)
    second.save(str(tmp_path / "model.ckpt"), global_step=3)
    steps = sorted(f.split(".index")[0] for f in os.listdir(tmp_path) if f.endswith(".index"))
    assert steps == ["model.ckpt-1", "model.ckpt-2", "model.ckpt-3"]


@pytest.mark.parametrize("relative", [True, False])
def test_state_file_paths_relative_or_absolute(tmp_path, relative):
    saver = Saver([Variable("x", np.zeros(1))], save_relative_paths=relative)
    prefix = saver.save(str(tmp_path / "model.ckpt"), global_step=5)
    text = (tmp_path / "checkpoint").read_text()
    written = "model.ckpt-5" if relative else prefix
    assert f'model_checkpoint_path: "{written}"' in text
    assert "all_model_checkpoint_timestamps" not in text  # the TF1 Saver writes none
    assert state.latest_checkpoint(str(tmp_path)) == prefix


def test_structure_record_is_saved_with_the_variables_and_checked(tmp_path):
    from orchestrator.checkpoint.structure import STRUCTURE_KEY, read_structure

    kernel, bias = Variable("dense/kernel", np.ones((2, 3), np.float32)), Variable("dense/bias", np.zeros(3, np.float32))
    spec = {"kind": "softmax", "input_dim": 2, "num_classes": 3}
    saver = Saver([kernel, bias], structure={"spec": spec, "variables": ["dense/kernel", "dense/bias"]})
    prefix = saver.save(str(tmp_path / "model.ckpt"), global_step=3)
    record = read_structure(reader.CheckpointReader(prefix))
    assert record["spec"] == spec and record["variables"] == ["dense/kernel", "dense/bias"]
    saver.restore(prefix)  # the record is saved, never restored into a variable
    with pytest.raises(ValueError, match=r"does not save: \['dense/bias'\]"):
        Saver([kernel], structure={"spec": spec, "variables": ["dense/kernel", "dense/bias"]})
    with pytest.raises(TypeError, match="structure must be a model"):
        Saver([kernel], structure="mlp")
    assert STRUCTURE_KEY not in Saver([kernel, bias]).tensors()


def test_unsaveable_variable_in_a_resave_leaves_the_previous_checkpoint_whole(tmp_path):
    # One shard can be written, the other cannot: the one that was written must not have
    # replaced (and then taken down) the previous checkpoint's data file of the same name.
    big = Variable("a", np.ones(1000, np.float32))
    first = Saver([big, Variable("b", np.ones(10, np.float32))], num_shards=2).save(str(tmp_path / "model.ckpt"))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    big.assign(np.full(1000, 2, np.float32))
    bad = Variable("b", np.array(["2020-01-01"], "datetime64[D]"))
    with pytest.raises(UnsupportedDtypeError, match="'b'"):
        Saver([big, bad], num_shards=2).save(str(tmp_path / "model.ckpt"))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert state.latest_checkpoint(str(tmp_path)) == first
    with reader.load_checkpoint(str(tmp_path)) as ckpt:
        assert ckpt.get_tensors()["a"].tolist() == [1] * 1000


@pytest.mark.parametrize("entry", ["saver", "write_checkpoint"])
def test_a_save_path_ending_in_a_separator_is_refused_and_nothing_is_written(tmp_path, entry):
    # "run/ckpt/" names a directory, not a prefix: it used to become the prefix "run/ckpt", writing
    # ckpt.index next to the directory and replacing the parent directory's state file.
    target = tmp_path / "ckpt"
    target.mkdir()
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "other.ckpt-1"\n')
    var = Variable("v", np.zeros(3, np.float32))
    with pytest.raises(InvalidCheckpointWriteError, match="ckpt/'.*prefix"):
        if entry == "saver":
            Saver([var]).save(str(target) + os.sep)
        else:
            write_checkpoint(str(target) + os.sep, {"v": var})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt"]
    assert os.listdir(target) == []
    assert (tmp_path / "checkpoint").read_text() == 'model_checkpoint_path: "other.ckpt-1"\n'


def test_python_scalars_and_lists_are_variables_too(tmp_path):
    # tf.Variable(3.5) and tf.Variable([1, 2]) work; so must ours, through save and restore
    step, weights = Variable("step", 7), Variable("w", [1.5, 2.5])
    assert (step.shape, step.dtype, weights.shape) == ((), np.dtype(np.int64), (2,))
    prefix = Saver([step, weights]).save(str(tmp_path / "model.ckpt"))
    restored = [Variable("step", 0), Variable("w", [0.0, 0.0])]
    Saver(restored).restore(prefix)
    assert [v.numpy().tolist() for v in restored] == [7, [1.5, 2.5]]
    assert repr(restored[0]) == "Variable('step', shape=(), dtype=int64)"


def test_subset_restore_ignores_a_tensor_of_a_dtype_it_cannot_decode(tmp_path):
    # A checkpoint written elsewhere may hold a dtype newer than this reader (TF keeps adding
    # them); restoring other variables from it must not depend on that tensor.
    prefix = str(tmp_path / "m")
    write_checkpoint(prefix, {"w": np.arange(3, dtype=np.float32), "z": np.zeros(2, np.uint8)})
    index = reader.CheckpointReader(prefix)
    entries = {}
    for key, value in table.Table((tmp_path / "m.index").read_bytes(), prefix + ".index").items():
        if key:
            entry = BundleEntryProto.FromString(value)
            entry.dtype = 99 if key == b"z" else entry.dtype
            entries[key.decode()] = entry.SerializeToString()
    (tmp_path / "m.index").write_bytes(bundle.build_index_bytes(entries, index.num_shards))
    w = Variable("w", np.zeros(3, np.float32))
    Saver([w]).restore(prefix)
    assert w.numpy().tolist() == [0, 1, 2]
    with pytest.raises(UnsupportedDtypeError, match="'z'.*DataType\\(99\\)"):
        Saver([Variable("z", np.zeros(2, np.uint8))]).restore(prefix)


@pytest.mark.parametrize("value", [np.array(["ab", "ünï"]), np.array([b"ab", b"\xff\x00"]),
                                   np.array([b"ab", b""], dtype=object)], ids=["str", "bytes", "object"])
def test_string_variables_restore_what_they_saved(tmp_path, value):
    # numpy str/bytes arrays save as DT_STRING; restoring must give them back, longer strings too
    var = Variable("s", value)
    prefix = Saver([var]).save(str(tmp_path / "model.ckpt"))
    target = Variable("s", np.zeros(2, {"U": "U1", "S": "S1", "O": object}[value.dtype.kind]))  # narrower
    Saver([target]).restore(prefix)
    assert target.numpy().tolist() == value.tolist() and target.dtype.kind == value.dtype.kind

"""The plug-in side of the engine without Ray: the randomness helper, protocol checks, file data,
factories, and load_model of a plug-in checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.checkpoint.structure import structure_tensors
from orchestrator.checkpoint.writer import write_checkpoint
from orchestrator.engine import plugins, protocol, rng
from orchestrator.engine.backend import numpy_backend
from orchestrator.engine.data import DatasetError, from_arrays
from orchestrator.engine.files import FileSource, load_files
from orchestrator.engine.loading import ModelLoadError, load_model
from orchestrator.plugin import Variable
from tests.plugin_fixtures import encode, make_arrays, write_bytes, write_plugin


# ---------------------------------------------------------------------------- randomness helper
def test_uniform_rows_depend_only_on_seed_step_stream_and_example_index():
    whole = rng.uniform(7, 3, 100, (10, 4, 5))
    parts = [rng.uniform(7, 3, 100 + start, (stop - start, 4, 5)) for start, stop in ((0, 3), (3, 10))]
    assert whole.dtype == np.float32 and whole.shape == (10, 4, 5)
    assert np.array_equal(np.concatenate(parts), whole)             # any split of the batch
    assert 0.0 <= whole.min() and whole.max() < 1.0
    for other in (rng.uniform(8, 3, 100, (10, 4, 5)), rng.uniform(7, 4, 100, (10, 4, 5)),
                  rng.uniform(7, 3, 100, (10, 4, 5), stream=1)):
        assert not np.array_equal(other, whole)
    many = rng.uniform(0, 0, 0, (20000,), dtype=np.float64)
    assert many.dtype == np.float64 and abs(many.mean() - 0.5) < 0.01 and len(np.unique(many)) == len(many)
    with pytest.raises(ValueError, match="stream"):
        rng.uniform(0, 0, 0, (2, 2), stream=-1)


# ---------------------------------------------------------------------------- protocol checks
def test_step_and_eval_outputs_are_normalised_or_rejected_by_name():
    out = protocol.parse_step_output((np.float32(2.5), None, {"w": np.zeros(2)}, {"mse_sum": 4}))
    assert (out.loss_sum, out.num_correct, out.metrics) == (2.5, None, {"mse_sum": 4.0})
    with pytest.raises(protocol.PluginError, match=r"must return \(loss_sum, num_correct, grads\)"):
        protocol.parse_step_output((1.0, 2))
    with pytest.raises(protocol.PluginError, match="grads must be a dict"):
        protocol.parse_step_output((1.0, 2, [np.zeros(2)]))
    with pytest.raises(protocol.PluginError, match="loss_sum must be a number"):
        protocol.parse_step_output(("x", 2, {}))
    assert protocol.parse_eval_output((0.5, None, {"mae": 1})).accuracy is None
    with pytest.raises(protocol.PluginError, match="metrics must be a dict"):
        protocol.parse_eval_output((0.5, 0.1, 3))


def test_model_checks_name_the_problem():
    w = Variable("w", np.zeros((2, 3), np.float32))

    class Good:
        variables = [w]

        def loss_and_grads(self, *a, **k):
            return 0.0, 0, {}

        def evaluate(self, *a):
            return 0.0, 0.0

    protocol.check_model(Good(), "m:build")
    bad = Good()
    bad.variables = [w, Variable("w", np.zeros(1, np.float32))]
    with pytest.raises(protocol.PluginError, match=r"variable name\(s\) \['w'\] used more than once"):
        protocol.check_model(bad, "m:build")
    bad.variables = [Variable("steps", np.zeros(1, np.int64))]
    with pytest.raises(protocol.PluginError, match="'steps' has dtype int64"):
        protocol.check_model(bad, "m:build")
    with pytest.raises(protocol.GradientError, match=r"no gradient for variable\(s\) \['w'\]"):
        protocol.check_grads({}, [w])
    with pytest.raises(protocol.GradientError, match="'w' has dtype float64"):
        protocol.check_grads({"w": np.zeros((2, 3))}, [w])


# ---------------------------------------------------------------------------- factories
def test_factory_import_errors_are_plugin_errors_with_the_key(tmp_path, monkeypatch):
    module = write_plugin(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert callable(plugins.import_callable(f"{module}:build", "model.factory"))
    with pytest.raises(protocol.PluginError, match="No module named 'nope_zz'") as info:
        plugins.import_callable("nope_zz:build", "model.factory")
    assert info.value.key == "model.factory"
    assert plugins.check_factory_name("a.b:c.d") is None and "module:callable" in plugins.check_factory_name("a.b")
    spec = plugins.PluginSpec(f"{module}:build", {"keep_prob": 0.5}, (12,), 3)
    model = plugins.build_plugin_model(spec, numpy_backend(), seed=1)
    assert [v.name for v in model.variables] == ["linear/weights", "linear/bias"]
    assert plugins.PluginSpec.from_dict(spec.to_dict()) == spec


def test_load_model_rebuilds_a_plugin_only_with_the_factory_the_caller_names(tmp_path, monkeypatch):
    module = write_plugin(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = plugins.PluginSpec(f"{module}:build", {"keep_prob": 0.5}, (12,), 3)
    trained = plugins.build_plugin_model(spec, numpy_backend(), seed=9)
    values = {v.name: np.random.default_rng(1).standard_normal(v.shape).astype(np.float32) for v in trained.variables}
    prefix = str(tmp_path / "ckpt" / "model.ckpt-3")
    write_checkpoint(prefix, {**values, **structure_tensors(spec.to_dict(), list(values))})

    with pytest.raises(ModelLoadError, match=f"built by {module}:build.*pass factory='{module}:build'"):
        load_model(prefix)
    for factory in (f"{module}:build", plugins.import_callable(f"{module}:build", "factory")):
        model = load_model(prefix, factory=factory)
        assert {v.name: v.value.tobytes() for v in model.variables} == {k: v.tobytes() for k, v in values.items()}
        assert model.keep_prob == 0.5                         # the recorded args were used
    x, y = make_arrays(20)
    assert 0 <= model.evaluate({v.name: v.value for v in model.variables}, x, y)[1] <= 1


# ---------------------------------------------------------------------------- data files
@pytest.mark.parametrize("fmt", ["npz", "parquet", "csv"])
def test_each_file_format_reads_the_same_examples(tmp_path, memory_root, fmt):
    x, y = make_arrays(40)
    if fmt == "csv":
        data = ("y," + ",".join(f"f{i}" for i in range(x.shape[1])) + "\n" +
                "\n".join(f"{label}," + ",".join(repr(float(v)) for v in row) for row, label in zip(x, y))).encode()
    else:
        data = encode(fmt, x, y)
    path = f"{memory_root}/train.{fmt}"
    write_bytes(path, data)
    features = "x" if fmt == "npz" else None                   # tables: every column but the labels
    dataset = load_files(FileSource(fmt, path, features=features, labels="y", eval_fraction=0.25))
    assert len(dataset.train_y) == 30 and len(dataset.test_y) == 10 and dataset.num_classes == 3
    rows = np.concatenate([dataset.train_x, dataset.test_x])
    order = np.argsort(np.concatenate([np.flatnonzero(~np.isin(np.arange(40), _eval_rows(40))),
                                       _eval_rows(40)]))
    np.testing.assert_allclose(rows[order], x, rtol=1e-6)
    assert np.array_equal(np.concatenate([dataset.train_y, dataset.test_y])[order], y)


def _eval_rows(n: int) -> np.ndarray:
    from orchestrator.engine.files import split_off

    _, (_, ids) = split_off((np.arange(n), np.arange(n)), 0.25)
    return ids


def test_npy_directory_list_columns_and_regression_targets(tmp_path):
    x, _ = make_arrays(30)
    targets = x.sum(axis=1).astype(np.float32)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "images.npy", x.reshape(30, 3, 4))
    np.save(tmp_path / "npy" / "target.npy", targets)
    dataset = load_files(FileSource("npy", str(tmp_path / "npy"), features="images", labels="target"))
    assert dataset.input_shape == (3, 4) and dataset.is_regression and dataset.num_classes is None
    with pytest.raises(DatasetError, match=r"no labels.npy; the .npy arrays there are \['images', 'target'\]"):
        load_files(FileSource("npy", str(tmp_path / "npy"), features="images", labels="labels"))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pixels": pa.array(list(x), type=pa.list_(pa.float32())), "y": targets}),
                   tmp_path / "t.parquet")
    table = load_files(FileSource("parquet", str(tmp_path / "t.parquet"), features="pixels"))
    assert table.input_shape == (12,) and np.array_equal(table.train_x, x)


def test_parquet_on_s3_with_an_eval_file(s3_bucket, s3_options):
    x, y = make_arrays(50)
    write_bytes(f"{s3_bucket}/d/train.parquet", encode("parquet", x[:40], y[:40]), s3_options)
    write_bytes(f"{s3_bucket}/d/eval.parquet", encode("parquet", x[40:], y[40:]), s3_options)
    dataset = load_files(FileSource("parquet", f"{s3_bucket}/d/train.parquet", labels="y",
                                    eval_path=f"{s3_bucket}/d/eval.parquet", storage_options=s3_options))
    assert np.array_equal(dataset.test_x, x[40:]) and np.array_equal(dataset.train_y, y[:40])
    with pytest.raises(DatasetError, match="no such file") as info:
        load_files(FileSource("parquet", f"{s3_bucket}/d/none.parquet", storage_options=s3_options))
    assert info.value.key == "data.path"


def test_npz_holding_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    with pytest.raises(DatasetError, match="never pickled"):
        load_files(FileSource("npz", str(tmp_path / "p.npz")))


def test_from_arrays_checks_the_eval_split_against_train():
    x, y = make_arrays(20)
    with pytest.raises(DatasetError, match=r"eval features have shape \[N, 5\] but train features \[N, 12\]"):
        from_arrays((x, y), (x[:, :5], y), None, "src")
    with pytest.raises(DatasetError, match="eval labels are float32 but train labels int64"):
        from_arrays((x, y), (x, y.astype(np.float32)), None, "src")
    with pytest.raises(DatasetError, match="at least 2 classes"):
        from_arrays((x, np.zeros(20, np.int64)), None, None, "src")

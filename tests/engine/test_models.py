"""Model specs, variable naming and deterministic initialization."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.engine.backend import numpy_backend
from orchestrator.engine.models import ModelSpec, ModelSpecError, build_model


def test_reference_mlp_has_tf_names_shapes_and_order():
    model = build_model(ModelSpec(), numpy_backend(), seed=0)
    assert [(v.name, v.shape) for v in model.variables] == [
        ("dense/kernel", (784, 625)), ("dense/bias", (625,)),
        ("dense_1/kernel", (625, 625)), ("dense_1/bias", (625,)),
        ("dense_2/kernel", (625, 10)), ("dense_2/bias", (10,)),
    ]
    assert all(v.dtype == np.float32 and v.trainable for v in model.variables)


def test_softmax_regression_is_one_dense_layer():
    spec = ModelSpec(kind="softmax", input_dim=64, hidden=(625, 625), num_classes=10)
    assert spec.hidden == () and spec.keep_prob_hidden == 1.0
    model = build_model(spec, numpy_backend(), seed=0)
    assert [(v.name, v.shape) for v in model.variables] == [("dense/kernel", (64, 10)), ("dense/bias", (10,))]


def test_initialization_is_glorot_uniform_and_a_function_of_the_seed():
    spec = ModelSpec(input_dim=64, hidden=(100,), num_classes=10)
    a, b = (build_model(spec, numpy_backend(), seed=7) for _ in range(2))
    c = build_model(spec, numpy_backend(), seed=8)
    for va, vb, vc in zip(a.variables, b.variables, c.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    kernel = a.variables[0].numpy()
    limit = np.sqrt(6 / (64 + 100))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit
    assert not np.array_equal(kernel, c.variables[0].numpy())
    np.testing.assert_array_equal(a.variables[1].numpy(), 0.0)


def test_spec_round_trips_through_json():
    spec = ModelSpec(kind="mlp", input_dim=64, hidden=(32, 16), num_classes=10, activation="gelu",
                     keep_prob_input=0.9, keep_prob_hidden=0.6)
    record = json.loads(json.dumps(spec.to_dict()))
    assert record["hidden"] == [32, 16]
    assert ModelSpec.from_dict(record) == spec


@pytest.mark.parametrize("record, message", [
    ({"kind": "mlp", "layers": 3}, "layers"),
    ({"kind": "cnn"}, "kind"),
    ({"activation": "tanh"}, "activation"),
    ({"input_dim": 0}, "input_dim"),
    ({"hidden": [10, -1]}, "hidden"),
    ({"keep_prob_hidden": 0.0}, "keep_prob_hidden"),
    ({"num_classes": 1}, "num_classes"),
])
def test_from_dict_rejects_bad_records_by_name(record, message):
    with pytest.raises(ModelSpecError, match=message):
        ModelSpec.from_dict(record)


def test_evaluate_and_logits_use_no_dropout():
    spec = ModelSpec(input_dim=8, hidden=(16,), num_classes=3, keep_prob_input=0.5, keep_prob_hidden=0.5)
    model = build_model(spec, numpy_backend(), seed=1)
    data = np.random.default_rng(0)
    x, y = data.random((50, 8), dtype=np.float32), data.integers(0, 3, 50)
    loss, accuracy = model.evaluate(None, x, y, batch_size=16)
    eval_sum = model.loss_and_grads(model.params(), x, y, step=0, example_offset=0, global_batch_size=50,
                                    seed=0, train=False)[0]
    assert loss == pytest.approx(eval_sum / 50, rel=1e-6)
    assert accuracy == pytest.approx(np.mean(model.logits(None, x).argmax(axis=1) == y))


def test_wrong_input_width_is_reported():
    model = build_model(ModelSpec(input_dim=8, hidden=(4,), num_classes=3), numpy_backend(), seed=1)
    with pytest.raises(ValueError, match=r"\[batch, 8\]"):
        model.evaluate(None, np.zeros((2, 9), np.float32), np.zeros(2, np.int64))


def test_reused_buffers_never_leak_into_returned_predictions():
    model = build_model(ModelSpec(input_dim=8, hidden=(4,), num_classes=3), numpy_backend(), seed=1)
    data = np.random.default_rng(0)
    x, y = data.random((6, 8), dtype=np.float32), data.integers(0, 3, 6)
    logits = model.logits(None, x)
    kept = logits.copy()
    for step in range(2):
        model.loss_and_grads(model.params(), x, y, step=step, example_offset=0, global_batch_size=6,
                             seed=0, reuse_buffers=True)
        model.evaluate(None, x, y)
    np.testing.assert_array_equal(logits, kept)

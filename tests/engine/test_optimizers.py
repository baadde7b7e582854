"""Optimizer updates: hand-computed values, a scalar reference over several steps, and TF1 itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.checkpoint.variables import Variable
from orchestrator.engine.optimizers import OptimizerConfigError, make_optimizer

GRADS = [0.5, -1.25, 2.0, 0.125, -0.75]


def _run(optimizer, grads, backend, initial=1.0, dtype=np.float64):
    var = Variable("w", backend.asarray(np.full((3,), initial, dtype=dtype)))
    slots = optimizer.create_slots(var)
    history = []
    for step, g in enumerate(grads):
        optimizer.apply(var, backend.asarray(np.full((3,), g, dtype=dtype)), slots, step)
        history.append(float(var.numpy()[0]))
    return history, [float(s.numpy()[0]) for s in slots]


# ------------------------------------------------------------------ first step, by hand
@pytest.mark.parametrize("name, hyper, expected", [
    ("sgd", {}, 1.0 - 0.01 * 0.5),
    ("momentum", {"momentum": 0.9}, 1.0 - 0.01 * 0.5),                   # accum = 0.5
    ("rmsprop", {"decay": 0.9}, 0.9948012475511806),                      # ms = 0.925, mom = 0.005198752...
    ("adam", {}, 0.9900000063245513),                                     # first Adam step moves ~lr
])
def test_first_update_matches_hand_computed_value(name, hyper, expected, backend):
    history, _ = _run(make_optimizer(name, 0.01, **hyper), [0.5], backend)
    assert history[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------ several steps vs scalar formulas
def _reference(name, lr, hyper, grads):
    """TF1 update rules, written out on Python floats."""
    var, history = 1.0, []
    accum, ms, mom, m, v = 0.0, 1.0, 0.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        if name == "sgd":
            var -= lr * g
        elif name == "momentum":
            accum = hyper["momentum"] * accum + g
            var -= lr * accum
        elif name == "rmsprop":
            ms = hyper["decay"] * ms + (1 - hyper["decay"]) * g * g
            mom = hyper["momentum"] * mom + lr * g / math.sqrt(ms + hyper["epsilon"])
            var -= mom
        else:
            lr_t = lr * math.sqrt(1 - hyper["beta2"] ** t) / (1 - hyper["beta1"] ** t)
            m = hyper["beta1"] * m + (1 - hyper["beta1"]) * g
            v = hyper["beta2"] * v + (1 - hyper["beta2"]) * g * g
            var -= lr_t * m / (math.sqrt(v) + hyper["epsilon"])
        history.append(var)
    return history


CASES = [
    ("sgd", {}),
    ("momentum", {"momentum": 0.9}),
    ("rmsprop", {"decay": 0.9, "momentum": 0.0, "epsilon": 1e-10}),
    ("rmsprop", {"decay": 0.8, "momentum": 0.9, "epsilon": 1e-6}),
    ("adam", {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
    ("adam", {"beta1": 0.5, "beta2": 0.9, "epsilon": 1e-3}),
]


@pytest.mark.parametrize("name, hyper", CASES)
def test_updates_over_several_steps_match_the_formulas(name, hyper, backend):
    history, _ = _run(make_optimizer(name, 0.05, **hyper), GRADS, backend)
    np.testing.assert_allclose(history, _reference(name, 0.05, hyper, GRADS), rtol=1e-12)


@pytest.mark.parametrize("name, hyper", CASES)
def test_float32_updates_stay_float32_and_close(name, hyper, backend):
    optimizer = make_optimizer(name, 0.05, **hyper)
    var = Variable("w", backend.asarray(np.ones(4, np.float32)))
    slots = optimizer.create_slots(var)
    for step, g in enumerate(GRADS):
        optimizer.apply(var, backend.asarray(np.full(4, g, np.float32)), slots, step)
    assert var.dtype == np.float32 and all(s.dtype == np.float32 for s in slots)
    np.testing.assert_allclose(var.numpy(), _reference(name, 0.05, hyper, GRADS)[-1], rtol=1e-5)


# ------------------------------------------------------------------ slots
@pytest.mark.parametrize("name, names, initial", [
    ("sgd", [], []),
    ("momentum", ["dense/kernel/Momentum"], [0.0]),
    ("rmsprop", ["dense/kernel/RMSProp", "dense/kernel/RMSProp_1"], [1.0, 0.0]),
    ("adam", ["dense/kernel/Adam", "dense/kernel/Adam_1"], [0.0, 0.0]),
])
def test_slots_have_tf1_names_and_initial_values(name, names, initial):
    var = Variable("dense/kernel", np.full((2, 3), 7.0, np.float32))
    slots = make_optimizer(name, 0.1).create_slots(var)
    assert [s.name for s in slots] == names
    for slot, value in zip(slots, initial):
        assert slot.shape == (2, 3) and slot.dtype == np.float32 and not slot.trainable
        np.testing.assert_array_equal(slot.numpy(), value)


def test_apply_touches_only_the_given_variable():
    optimizer = make_optimizer("rmsprop", 0.1)
    owned, other = Variable("a", np.ones(2, np.float32)), Variable("b", np.ones(2, np.float32))
    owned_slots, other_slots = optimizer.create_slots(owned), optimizer.create_slots(other)
    optimizer.apply(owned, np.ones(2, np.float32), owned_slots, 0)
    assert (owned.numpy() < 1).all()
    np.testing.assert_array_equal(other.numpy(), 1.0)
    np.testing.assert_array_equal(other_slots[0].numpy(), 1.0)


def test_apply_rejects_wrong_shapes_and_slots():
    optimizer = make_optimizer("adam", 0.1)
    var = Variable("dense/bias", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="dense/bias"):
        optimizer.apply(var, np.zeros(4, np.float32), optimizer.create_slots(var), 0)
    with pytest.raises(ValueError, match="dense/bias/Adam"):
        optimizer.apply(var, np.zeros(3, np.float32), [], 0)


def test_config_errors_name_the_problem():
    with pytest.raises(OptimizerConfigError, match="'adagrad'"):
        make_optimizer("adagrad", 0.1)
    with pytest.raises(OptimizerConfigError, match="rho"):
        make_optimizer("rmsprop", 0.1, rho=0.9)
    with pytest.raises(OptimizerConfigError, match="decay"):
        make_optimizer("rmsprop", 0.1, decay=1.0)
    with pytest.raises(OptimizerConfigError, match="learning_rate"):
        make_optimizer("sgd", 0.0)
    # the job config passes every shared hyperparameter; unused ones are ignored
    assert make_optimizer("sgd", 0.1, momentum=0.9, decay=0.9, beta1=0.9, beta2=0.99, epsilon=1e-7).hyper == {}


# ------------------------------------------------------------------ against TensorFlow 1 optimizers
def _tf_optimizer(tf, name, lr, hyper):
    train = tf.compat.v1.train
    if name == "sgd":
        return train.GradientDescentOptimizer(lr)
    if name == "momentum":
        return train.MomentumOptimizer(lr, momentum=hyper["momentum"])
    if name == "rmsprop":
        return train.RMSPropOptimizer(lr, decay=hyper["decay"], momentum=hyper["momentum"],
                                      epsilon=hyper["epsilon"])
    return train.AdamOptimizer(lr, beta1=hyper["beta1"], beta2=hyper["beta2"], epsilon=hyper["epsilon"])


def _run_tf(tf, name, lr, hyper, initial, grads):
    graph = tf.Graph()
    with graph.as_default():
        var = tf.compat.v1.Variable(initial, name="dense/kernel")
        grad = tf.compat.v1.placeholder(tf.float32, initial.shape)
        optimizer = _tf_optimizer(tf, name, lr, hyper)
        train = optimizer.apply_gradients([(grad, var)])
        slots = [optimizer.get_slot(var, s) for s in optimizer.get_slot_names()]
        slot_names = sorted(s.op.name for s in slots)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for g in grads:
                session.run(train, {grad: g})
            return session.run(var), dict(zip(slot_names, session.run(sorted(slots, key=lambda s: s.op.name))))


@pytest.mark.tf
@pytest.mark.parametrize("name, hyper", CASES[:2] + [("rmsprop", {"decay": 0.9, "momentum": 0.0, "epsilon": 1e-10}),
                                                     ("rmsprop", {"decay": 0.9, "momentum": 0.9, "epsilon": 1e-10}),
                                                     CASES[4]])
def test_matches_tensorflow_v1_optimizers(name, hyper):
    tf = pytest.importorskip("tensorflow")
    data = np.random.default_rng(0)
    initial = data.normal(size=(4, 3)).astype(np.float32)
    grads = [data.normal(size=(4, 3)).astype(np.float32) for _ in range(6)]
    tf_value, tf_slots = _run_tf(tf, name, 0.01, hyper, initial, grads)

    optimizer = make_optimizer(name, 0.01, **hyper)
    var = Variable("dense/kernel", initial.copy())
    slots = optimizer.create_slots(var)
    for step, g in enumerate(grads):
        optimizer.apply(var, g, slots, step)
    # Agreement to about one float32 ulp: Adam's beta powers and (1 - beta) are computed in float32
    # as TF1 does (float64 would be off by ~1e-5 relative); TF's rsqrt may differ in the last bit.
    np.testing.assert_allclose(var.numpy(), tf_value, rtol=2e-6, atol=1e-7)
    assert sorted(s.name for s in slots) == sorted(tf_slots)
    for slot in slots:
        np.testing.assert_allclose(slot.numpy(), tf_slots[slot.name], rtol=2e-6, atol=1e-8, err_msg=slot.name)

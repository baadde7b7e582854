"""Checkpoints written by real TensorFlow, for interop tests.

Imports TensorFlow at module level: import this only from a test module that has
already done ``pytest.importorskip("tensorflow")``. Each writer returns the prefix
TensorFlow reported, so tests read exactly what TF produced.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

TF1_DEVICES = 3  # logical CPUs in the TF1 session: one Saver shard per device


# ---------------------------------------------------------------------------- TF1 Saver
def _tf1_variables(num_partitions: int) -> dict[str, tf.Variable]:
    """Variables spread over three CPU devices, one of them partitioned."""
    v1 = tf.compat.v1
    with tf.device("/cpu:0"):
        w = v1.get_variable("dense/kernel", initializer=np.arange(12, dtype=np.float32).reshape(3, 4))
        v1.get_variable("names", initializer=tf.constant([b"a\x00b", b"\xff\xfe", b""]),
                        dtype=tf.string, trainable=False)
        v1.train.get_or_create_global_step()
    with tf.device("/cpu:1"):
        p = v1.get_variable("embedding", shape=[10, 4], dtype=tf.float32,
                            partitioner=v1.fixed_size_partitioner(num_partitions),
                            initializer=v1.random_normal_initializer(seed=1))
    with tf.device("/cpu:2"):
        v1.get_variable("counts", initializer=np.arange(5, dtype=np.int64), trainable=False)
        v1.get_variable("half", initializer=np.linspace(-1, 1, 7).astype(np.float16), trainable=False)
    return {"w": w, "p": p}


def write_tf1_saver(directory: str, sharded: bool, num_partitions: int = 3) -> str:
    """A TF1 graph-mode ``Saver`` checkpoint after one RMSProp step; returns its prefix.

    The save path is absolute, so the state file holds absolute paths and no
    timestamps, as TF1 writes them.
    """
    v1 = tf.compat.v1
    os.makedirs(directory, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        variables = _tf1_variables(num_partitions)
        loss = tf.reduce_sum(variables["w"] ** 2) + tf.reduce_sum(variables["p"].as_tensor() ** 2)
        train = v1.train.RMSPropOptimizer(0.1).minimize(loss, global_step=v1.train.get_global_step())
        saver = v1.train.Saver(sharded=sharded)
        config = v1.ConfigProto(device_count={"CPU": TF1_DEVICES})
        with v1.Session(graph=graph, config=config) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(train)
            return saver.save(sess, os.path.join(os.path.abspath(directory), "model.ckpt"),
                              global_step=v1.train.get_global_step())


def write_tf1_v1_saver(directory: str) -> str:
    """A TF1 ``Saver`` checkpoint in the old V1 format (one table file, no ``.index``)."""
    v1 = tf.compat.v1
    os.makedirs(directory, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        v1.get_variable("dense/kernel", initializer=np.arange(6, dtype=np.float32).reshape(2, 3))
        v1.get_variable("names", initializer=tf.constant([b"a", b""]), dtype=tf.string)
        saver = v1.train.Saver(write_version=v1.train.SaverDef.V1)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            return saver.save(sess, os.path.join(os.path.abspath(directory), "model.ckpt"), global_step=5)


# ---------------------------------------------------------------------------- TF2
def _trained_keras_checkpoint(legacy_optimizer: bool) -> tf.train.Checkpoint:
    """A tf-keras model and optimizer after one training step, plus odd-dtype extras."""
    tf.random.set_seed(0)
    model = tf_keras.Sequential([
        tf_keras.layers.Dense(8, activation="relu", input_shape=(4,)),
        tf_keras.layers.Dense(3),
    ])
    optimizers = tf_keras.optimizers.legacy if legacy_optimizer else tf_keras.optimizers
    optimizer = optimizers.Adam(0.01)
    x = tf.random.normal((16, 4))
    y = tf.random.normal((16, 3))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return tf.train.Checkpoint(
        model=model, optimizer=optimizer,
        half=tf.Variable(np.linspace(-2, 2, 5).astype(np.float16)),
        bf16=tf.Variable(tf.constant([1.5, -2.25, 3e38], tf.bfloat16)),
        tags=tf.Variable(tf.constant([b"x\x00y", "é".encode(), b""])),
    )


def write_keras_checkpoint(directory: str, legacy_optimizer: bool = False) -> str:
    """``tf.train.Checkpoint.save`` of a trained tf-keras model; returns the prefix."""
    checkpoint = _trained_keras_checkpoint(legacy_optimizer)
    return checkpoint.save(os.path.join(directory, "ckpt"))


def write_max_shard_checkpoint(directory: str, max_shard_size: int) -> str:
    """A TF2 save split by ``MaxShardSizePolicy`` into several data files.

    Includes ``big`` (4,000 bytes): the policy slices any tensor larger than
    ``max_shard_size`` and spreads the slices over shards.
    """
    checkpoint = _trained_keras_checkpoint(legacy_optimizer=False)
    checkpoint.big = tf.Variable(np.arange(1000, dtype=np.float32).reshape(50, 20) / 3)
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=max_shard_size)
    options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    return checkpoint.write(os.path.join(directory, "sharded"), options=options)


def write_manager_checkpoints(directory: str, saves: int, max_to_keep: int) -> list[str]:
    """``saves`` saves through ``tf.train.CheckpointManager``; returns the prefixes saved."""
    checkpoint = tf.train.Checkpoint(v=tf.Variable(np.arange(4, dtype=np.float32)))
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)
    prefixes = []
    for step in range(saves):
        checkpoint.v.assign_add(np.full(4, step, np.float32))
        prefixes.append(manager.save())
    return prefixes


def write_save_v2(prefix: str, tensors: Mapping[str, np.ndarray], order: Sequence[str] | None = None) -> str:
    """One ``SaveV2`` op (a single-shard bundle), tensors added in ``order``."""
    names = list(order if order is not None else tensors)
    values = [tf.constant(tensors[name]) for name in names]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=values)
    return prefix


# ---------------------------------------------------------------------------- comparing values
def canonical(value) -> tuple[str, tuple[int, ...], object]:
    """(kind, shape, payload) for a bit-exact comparison.

    Numbers compare by raw bytes (so NaN payloads and bfloat16 bits count);
    strings compare as lists of ``bytes``. A bare ``bytes`` (TF's string scalar)
    is a 0-d string tensor.
    """
    if isinstance(value, bytes):
        return "string", (), [value]
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "SU":
        return "string", array.shape, [bytes(item) for item in array.ravel()]
    return np.dtype(array.dtype).name, array.shape, array.tobytes()


def tf_numpy_dtype(tf_dtype: tf.DType) -> object:
    """TF's dtype as the numpy dtype our reader reports (``object`` for strings)."""
    if tf_dtype == tf.string:
        return np.dtype(object)
    return np.dtype(tf_dtype.as_numpy_dtype)


def write_tf1_variables(directory: str, values: Mapping[str, np.ndarray], step: int = 7) -> str:
    """A TF1 graph-mode ``Saver`` checkpoint of variables with these names and values, plus the
    global step and an RMSProp slot per variable (what a TF1 training script leaves); returns its prefix."""
    v1 = tf.compat.v1
    os.makedirs(directory, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        variables = [v1.get_variable(name, initializer=value) for name, value in values.items()]
        global_step = v1.train.get_or_create_global_step()
        loss = tf.add_n([tf.reduce_sum(v * 0.0) for v in variables])
        train = v1.train.RMSPropOptimizer(0.0).minimize(loss, global_step=global_step)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(v1.assign(global_step, step - 1))
            sess.run(train)
            return v1.train.Saver().save(sess, os.path.join(os.path.abspath(directory), "model.ckpt"),
                                         global_step=global_step)


def write_keras_weights(directory: str, input_dim: int, hidden: int, classes: int) -> tuple[str, list]:
    """``model.save_weights`` (TF2 object-based format) of a tf-keras MLP; returns (prefix, [kernel, bias, ...])."""
    tf.random.set_seed(1)
    model = tf_keras.Sequential([tf_keras.layers.Dense(hidden, activation="relu", input_shape=(input_dim,)),
                                 tf_keras.layers.Dense(classes)])
    prefix = os.path.join(directory, "weights")
    model.save_weights(prefix)
    return prefix, [w.numpy() for w in model.weights]

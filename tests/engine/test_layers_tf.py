"""tf.keras models with the same layers restore our checkpoints and compute our logits (float32, 1e-5).

The Keras side is built with Keras's own automatic layer names (after ``clear_session``)
and restores with ``Model.load_weights(<our checkpoint prefix>)``: a match shows our
variable names, shapes and layouts are Keras's, and our math is Keras's math.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")

from orchestrator.checkpoint.writer import write_checkpoint  # noqa: E402
from orchestrator.engine.backend import numpy_backend  # noqa: E402
from orchestrator.engine.loading import load_model, model_structure_tensors  # noqa: E402
from orchestrator.engine.network import SequentialSpec  # noqa: E402
from orchestrator.engine.transformer import TransformerSpec  # noqa: E402

pytestmark = pytest.mark.tf
L = keras.layers

CNN = SequentialSpec(input_shape=(8, 8, 1), num_classes=10, layers=[
    {"type": "conv2d", "filters": 6, "kernel_size": 3, "padding": "same", "activation": "relu"},
    {"type": "max_pooling2d", "pool_size": 3, "strides": 2, "padding": "same"},
    {"type": "conv2d", "filters": 8, "kernel_size": [2, 3], "strides": [1, 2], "activation": "tanh"},
    {"type": "average_pooling2d", "padding": "same"},
    {"type": "flatten"}, {"type": "dropout", "rate": 0.5},
    {"type": "dense", "units": 16, "activation": "gelu"},
    {"type": "dense"}])
TRANSFORMER = TransformerSpec(vocab=11, context=8, d_model=16, heads=2, layers=2, dropout=0.1)


def gelu(x):
    return tf.nn.gelu(x, approximate=True)


def keras_cnn():
    keras.backend.clear_session()
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    x = L.Conv2D(8, (2, 3), strides=(1, 2), activation="tanh")(x)
    x = L.AveragePooling2D(padding="same")(x)
    x = L.Dropout(0.5)(L.Flatten()(x))
    x = L.Dense(16, activation=gelu)(x)
    return keras.Model(inputs, L.Dense(10)(x))


class PositionEmbedding(keras.layers.Layer):
    """keras_nlp's PositionEmbedding, reduced to what the test needs."""

    def __init__(self, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length

    def build(self, input_shape):
        self.embeddings = self.add_weight(name="embeddings", shape=(self.sequence_length, input_shape[-1]))

    def call(self, x):
        return x + self.embeddings[:tf.shape(x)[1]]


def keras_transformer(spec):
    keras.backend.clear_session()
    inputs = keras.Input((spec.context,), dtype="int32")
    x = L.Embedding(spec.vocab, spec.d_model)(inputs)
    x = L.Dropout(spec.dropout)(PositionEmbedding(spec.context)(x))
    for _ in range(spec.layers):
        h = L.LayerNormalization(epsilon=spec.epsilon)(x)
        h = L.MultiHeadAttention(spec.heads, spec.d_model // spec.heads, dropout=spec.dropout)(
            h, h, use_causal_mask=True)
        x = x + L.Dropout(spec.dropout)(h)
        h = L.LayerNormalization(epsilon=spec.epsilon)(x)
        h = L.Dense(spec.ff_dim, activation=gelu)(h)
        h = L.Dense(spec.d_model)(h)
        x = x + L.Dropout(spec.dropout)(h)
    x = L.LayerNormalization(epsilon=spec.epsilon)(x)
    return keras.Model(inputs, L.Dense(spec.vocab)(x))


def _trained_checkpoint(spec, x, y, prefix):
    """A few SGD steps (so biases, gammas and betas leave their initial values), saved in 2 shards."""
    model = spec.build(numpy_backend(), seed=3)
    for step in range(3):
        grads = model.loss_and_grads(model.params(), x, y, step=step, example_offset=0,
                                     global_batch_size=len(x), seed=5)[2]
        model.assign({name: value - 0.5 * grads[name] for name, value in model.params().items()})
    tensors = {v.name: v.numpy() for v in model.variables}
    write_checkpoint(prefix, {**tensors, **model_structure_tensors(model)}, num_shards=2)
    return model, tensors


def _restore_and_compare(spec, keras_model, x, y, tmp_path):
    prefix = str(tmp_path / "model.ckpt-3")
    ours, tensors = _trained_checkpoint(spec, x, y, prefix)
    assert sorted(w.name.split(":")[0] for w in keras_model.weights) == sorted(tensors)
    keras_model.load_weights(prefix)
    for weight in keras_model.weights:
        np.testing.assert_array_equal(weight.numpy(), tensors[weight.name.split(":")[0]], err_msg=weight.name)
    expected = ours.logits(None, x)
    np.testing.assert_allclose(keras_model(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    rebuilt = load_model(prefix)                 # our side rebuilds the same model from the structure record
    assert rebuilt.spec == spec
    np.testing.assert_array_equal(rebuilt.logits(None, x), expected)


def test_keras_cnn_restores_our_checkpoint_and_matches_our_logits(tmp_path):
    data = np.random.default_rng(0)
    x = data.random((16, 8, 8, 1), dtype=np.float32)
    _restore_and_compare(CNN, keras_cnn(), x, data.integers(0, 10, 16), tmp_path)


def test_keras_transformer_restores_our_checkpoint_and_matches_our_logits(tmp_path):
    data = np.random.default_rng(1)
    x = data.integers(0, TRANSFORMER.vocab, (6, TRANSFORMER.context))
    y = data.integers(0, TRANSFORMER.vocab, (6, TRANSFORMER.context))
    _restore_and_compare(TRANSFORMER, keras_transformer(TRANSFORMER), x, y, tmp_path)

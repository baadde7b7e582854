"""Token and position embeddings.

``embedding`` (Keras ``Embedding``): integer ids [T] -> rows of ``embeddings`` [input_dim,
output_dim]; it takes the model's raw input, so it must come first. Ids outside
[0, input_dim) are an error (never wrapped around as numpy's negative indexing would).
``position_embedding`` (keras_nlp ``PositionEmbedding``): adds a learned row per
position, ``embeddings`` [sequence_length, width], to a [T, width] input with T <= sequence_length.
"""

from __future__ import annotations

from orchestrator.engine.layers.base import Builder, Layer, Option, Shape, positive_int, register
from orchestrator.errors import InvalidArgumentError


@register
class Embedding(Layer):
    type = "embedding"
    integer_input = True
    options = {"input_dim": Option(positive_int), "output_dim": Option(positive_int)}

    def build(self, builder: Builder, input_shape: Shape) -> Shape:
        super().build(builder, input_shape)
        shape = (self.config["input_dim"], self.config["output_dim"])
        self.embeddings = builder.variable(f"{self.name}/embeddings", shape, "uniform_0.05")
        return (*input_shape, self.config["output_dim"])

    def forward(self, params, x, run):
        vocab = self.config["input_dim"]
        if x.size and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise InvalidArgumentError(f"{self.name}: token ids must be in [0, {vocab}), got ids from "
                             f"{int(x.min())} to {int(x.max())}")
        return params[self.embeddings][x], x

    def backward(self, params, ids, dy, run, need_dx):
        table = params[self.embeddings]
        grad = run.xp.zeros(table.shape, dtype=dy.dtype)
        run.add_grad(self.embeddings, run.ops.scatter_add_rows(grad, ids.ravel(), dy.reshape(-1, table.shape[1])))
        return None


@register
class PositionEmbedding(Layer):
    type = "position_embedding"
    options = {"sequence_length": Option(positive_int)}

    def build(self, builder: Builder, input_shape: Shape) -> Shape:
        super().build(builder, input_shape)
        length = self.config["sequence_length"]
        if len(input_shape) != 2 or input_shape[0] > length:
            raise self._fail(f"needs [positions <= {length}, width] inputs, got {list(input_shape)}")
        width = input_shape[1]
        self.embeddings = builder.variable(f"{self.name}/embeddings", (length, width), "glorot_uniform",
                                           length, width)
        return input_shape

    def forward(self, params, x, run):
        return x + params[self.embeddings][:x.shape[1]], x.shape[1]

    def backward(self, params, positions, dy, run, need_dx):
        table = params[self.embeddings]
        grad = run.xp.zeros(table.shape, dtype=dy.dtype)
        grad[:positions] = dy.sum(axis=0)
        run.add_grad(self.embeddings, grad)
        return dy if need_dx else None

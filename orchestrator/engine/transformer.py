"""``kind: transformer``: a decoder-only (GPT-style, pre-norm) character model from a few numbers.

    model: {kind: transformer, vocab: 96, context: 64, d_model: 128, heads: 4, layers: 2}

expands to this layer list (so it is a ``Network`` like any sequential model, and its
variables carry the Keras names a functional tf.keras model of the same layers has):

    embedding(vocab, d_model) -> position_embedding(context) -> dropout
    layers x [ residual(layer_normalization -> multi_head_attention(causal) -> dropout)
               residual(layer_normalization -> dense(ff_dim, gelu) -> dense(d_model) -> dropout) ]
    layer_normalization -> dense(vocab)                       # logits for every position

Inputs are [B, context] token ids, labels the next token at each position [B, context].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.engine.backend import Backend
from orchestrator.engine.layers import parse_layers
from orchestrator.engine.models import ModelSpecError
from orchestrator.engine.network import Network, spec_fields_from_dict

ACTIVATIONS = ("gelu", "relu", "tanh")


@dataclass(frozen=True)
class TransformerSpec:
    vocab: int
    context: int
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    ff_dim: int | None = None          # null: 4 * d_model
    dropout: float = 0.1
    activation: str = "gelu"
    epsilon: float = 1e-5              # layer normalization
    kind: str = "transformer"

    def __post_init__(self) -> None:
        if self.kind != "transformer":
            raise ModelSpecError(f"kind must be 'transformer', got {self.kind!r}")
        for name in ("vocab", "context", "d_model", "heads", "layers", "ff_dim"):
            value = getattr(self, name)
            if value is None and name == "ff_dim":
                object.__setattr__(self, "ff_dim", 4 * int(self.d_model))
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelSpecError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab < 2:
            raise ModelSpecError(f"vocab must be >= 2, got {self.vocab}")
        if self.d_model % self.heads:
            raise ModelSpecError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ModelSpecError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ModelSpecError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise ModelSpecError(f"epsilon must be a positive number, got {self.epsilon!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "epsilon", float(self.epsilon))

    @property
    def input_shape(self) -> tuple[int]:
        return (self.context,)

    @property
    def num_classes(self) -> int:
        return self.vocab

    def layer_configs(self) -> list[dict]:
        """The expanded layer list, canonical (every option written out)."""
        return [layer.to_config() for layer in parse_layers(self._layers(), "layers")]

    def _layers(self) -> list[dict]:
        norm = {"type": "layer_normalization", "epsilon": self.epsilon}
        drop = {"type": "dropout", "rate": self.dropout}
        attention = {"type": "multi_head_attention", "num_heads": self.heads, "causal": True,
                     "dropout": self.dropout}
        feed_forward = [{"type": "dense", "units": self.ff_dim, "activation": self.activation},
                        {"type": "dense", "units": self.d_model}]
        block = [{"type": "residual", "layers": [norm, attention, drop]},
                 {"type": "residual", "layers": [norm, *feed_forward, drop]}]
        return [{"type": "embedding", "input_dim": self.vocab, "output_dim": self.d_model},
                {"type": "position_embedding", "sequence_length": self.context}, drop,
                *block * self.layers, norm, {"type": "dense", "units": self.vocab}]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": self.vocab, "context": self.context, "d_model": self.d_model,
                "heads": self.heads, "layers": self.layers, "ff_dim": self.ff_dim, "dropout": self.dropout,
                "activation": self.activation, "epsilon": self.epsilon}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "TransformerSpec":
        values = spec_fields_from_dict(cls, record)
        missing = sorted({"vocab", "context"} - set(values))
        if missing:
            raise ModelSpecError(f"transformer model spec lacks {missing}")
        return cls(**values)

    def build(self, backend: Backend, seed: int) -> Network:
        return Network(self, backend, seed)

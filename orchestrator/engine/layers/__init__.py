"""The layer library: layers with hand-written backward passes over the array backend.

Importing the package registers every layer type (``LAYER_TYPES``: the YAML ``type``
names). ``base`` holds the protocol, naming and the per-call ``Pass``; one module per
family: ``core`` (dense, activation, dropout, flatten, reshape, residual), ``conv``
(conv2d, max/average pooling), ``norm`` (layer normalization), ``embedding`` (token and
position embeddings), ``attention`` (multi-head self-attention).
"""

from orchestrator.engine.layers import attention, conv, core, embedding, norm  # noqa: F401  (registration)
from orchestrator.engine.layers.base import (
    LAYER_TYPES, Builder, Layer, LayerSpecError, Pass, backward_chain, build_chain, forward_chain,
    parse_layer, parse_layers,
)

__all__ = ["LAYER_TYPES", "Builder", "Layer", "LayerSpecError", "Pass", "backward_chain", "build_chain",
           "forward_chain", "parse_layer", "parse_layers"]

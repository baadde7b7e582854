"""What every layer shares: options parsed from YAML, variables with Keras names, and the pass context.

Design (reverse mode, layer by layer). A layer is an object with

    build(builder, input_shape) -> output_shape       # once: creates its Variables, fixes its name
    forward(params, x, run) -> (y, cache)             # cache: what its backward needs
    backward(params, cache, dy, run, need_dx) -> dx   # adds its parameter grads to run.grads

Shapes are per example (no batch axis). ``params`` maps variable names to arrays, so
the runtime can hand in parameters gathered from other workers without touching the
model's own Variables. Composite layers (``residual``) hold their sublayers' caches in
their own, so the backward pass walks the same tree the forward pass built: a tape
whose entries are layers, not scalar ops. Each backward is written by hand against
the array backend (numpy or cupy through ``run.xp``/``run.ops``), which is what lets
the hot elementwise parts run as fused kernels.

Names follow Keras: a layer's base name is the snake case of its Keras class
(``conv2d``, ``layer_normalization``), numbered per base name in build order
(``dense``, ``dense_1``, ...), and its variables are ``<layer>/<weight>``
(``conv2d/kernel``). Initial values are a function of (seed, variable index) only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from orchestrator.checkpoint.variables import Variable
from orchestrator.engine.models import ModelSpecError

Shape = tuple[int, ...]
_REQUIRED = object()


class LayerSpecError(ModelSpecError):
    """A layer description is invalid; the message starts with where it is (``layers[2].filters``)."""


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One YAML option of a layer: its default (or required) and a converter that validates it."""

    convert: Callable[[Any], Any]
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return int(value)


def pair(value: Any) -> list[int]:
    """An int n (meaning [n, n]) or a list of two positive ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"must be an integer or a list of two, got {list(value)!r}")
        return [positive_int(v) for v in value]
    n = positive_int(value)
    return [n, n]


def optional_pair(value: Any) -> list[int] | None:
    return None if value is None else pair(value)


def shape(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"must be a non-empty list of positive integers, got {value!r}")
    return [positive_int(v) for v in value]


def rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"must be a number in [0, 1), got {value!r}")
    return float(value)


def positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0.0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def choice(*allowed: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {list(allowed)}, got {value!r}")
        return value
    return convert


def optional_positive_int(value: Any) -> int | None:
    return None if value is None else positive_int(value)


def parse_options(options: Mapping[str, Option], raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Every option of ``options`` from ``raw`` (defaults filled in), or a LayerSpecError naming the key."""
    unknown = sorted(set(raw) - set(options))
    if unknown:
        raise LayerSpecError(f"{where}: unknown option(s) {unknown}; this layer takes {sorted(options)}")
    parsed = {}
    for key, option in options.items():
        if key not in raw:
            if option.required:
                raise LayerSpecError(f"{where}.{key}: missing (required)")
            parsed[key] = None if option.default is None else option.convert(option.default)
            continue
        try:
            parsed[key] = option.convert(raw[key])
        except ValueError as exc:
            raise LayerSpecError(f"{where}.{key}: {exc}") from None
    return parsed


# --------------------------------------------------------------------------- building
def _glorot_uniform(generator, shape_: Shape, fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return generator.uniform(-limit, limit, size=shape_)


INITIALIZERS: dict[str, Callable[..., np.ndarray]] = {
    "glorot_uniform": _glorot_uniform,
    "zeros": lambda generator, shape_, fan_in, fan_out: np.zeros(shape_),
    "ones": lambda generator, shape_, fan_in, fan_out: np.ones(shape_),
    "uniform_0.05": lambda generator, shape_, fan_in, fan_out: generator.uniform(-0.05, 0.05, size=shape_),
}


class Builder:
    """Hands out Keras-style layer names, creates Variables, numbers dropout sites."""

    def __init__(self, backend: Any, seed: int, dtype: Any = np.float32):
        self.backend, self.seed, self.dtype = backend, int(seed), np.dtype(dtype)
        self.variables: list[Variable] = []
        self._used: Counter[str] = Counter()
        self._dropout_sites = 0

    def layer_name(self, base: str) -> str:
        """``base``, then ``base_1``, ``base_2``, ... as Keras numbers layers of one class."""
        count = self._used[base]
        self._used[base] += 1
        return base if count == 0 else f"{base}_{count}"

    def variable(self, name: str, shape_: Shape, init: str, fan_in: int = 1, fan_out: int = 1) -> str:
        """Create variable ``name``: initial value from Philox(SeedSequence([seed, index]))."""
        generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, len(self.variables)])))
        value = INITIALIZERS[init](generator, tuple(shape_), fan_in, fan_out).astype(self.dtype)
        self.variables.append(Variable(name, self.backend.asarray(value)))
        return name

    def dropout_site(self) -> int:
        """The layer id of the next dropout site (the ``layer`` word of the Philox counter)."""
        site = self._dropout_sites
        self._dropout_sites += 1
        return site


# --------------------------------------------------------------------------- one pass
@dataclass
class Pass:
    """One forward/backward call: where dropout masks come from, and the grads collected."""

    xp: Any
    ops: Any
    train: bool
    step: int = 0
    seed: int = 0
    example_offset: int = 0
    grads: dict[str, Any] = field(default_factory=dict)

    def dropout_mask(self, site: int, shape_: Shape, keep_prob: float, dtype: Any,
                     blocks: Any = None) -> Any | None:
        """Scaled keep-mask of ``shape_`` (batch first) for dropout site ``site``, None when not training.

        Units are the flattened per-example positions, so the mask of example i depends only
        on (seed, step, site, example_offset + i): any split of the batch draws the same bits.
        ``blocks``: the only Philox blocks whose units matter (``ops.dropout_mask``).
        """
        if not self.train or keep_prob >= 1.0:
            return None
        batch, units = shape_[0], int(np.prod(shape_[1:], dtype=np.int64))
        mask = self.ops.dropout_mask(self.seed, self.step, site, self.example_offset, (batch, units),
                                     keep_prob, dtype, blocks)
        return mask.reshape(shape_)

    def add_grad(self, name: str, value: Any) -> None:
        """Set (first use) or accumulate (a shared variable) the gradient of ``name``."""
        if name in self.grads:
            self.grads[name] = self.grads[name] + value
        else:
            self.grads[name] = value


# --------------------------------------------------------------------------- the layer protocol
class Layer:
    """Base class; subclasses set ``type`` (YAML name = Keras base name) and ``options``."""

    type: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    integer_input: ClassVar[bool] = False      # takes token ids, not features (embedding)

    def __init__(self, config: Mapping[str, Any], where: str = ""):
        self.config = dict(config)
        self.where = where or self.type          # where the layer was described (for errors)
        self.name = ""

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str) -> "Layer":
        return cls(parse_options(cls.options, raw, where), where)

    def to_config(self) -> dict[str, Any]:
        """The canonical description (every option, defaults filled in): what a checkpoint records."""
        return {"type": self.type, **self.config}

    def build(self, builder: Builder, input_shape: Shape) -> Shape:
        self.name = builder.layer_name(self.type)
        return self.output_shape(input_shape)

    def output_shape(self, input_shape: Shape) -> Shape:
        return input_shape

    def forward(self, params: Mapping[str, Any], x: Any, run: Pass) -> tuple[Any, Any]:
        raise NotImplementedError

    def backward(self, params: Mapping[str, Any], cache: Any, dy: Any, run: Pass, need_dx: bool) -> Any:
        raise NotImplementedError

    def _fail(self, message: str) -> LayerSpecError:
        return LayerSpecError(f"{self.where} ({self.type}): {message}")


# --------------------------------------------------------------------------- registry and chains
LAYER_TYPES: dict[str, type[Layer]] = {}


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make ``cls`` available in YAML as ``type: <cls.type>``."""
    LAYER_TYPES[cls.type] = cls
    return cls


def parse_layer(raw: Any, where: str) -> Layer:
    """A layer from its YAML mapping ``{type: ..., <options>}``."""
    if not isinstance(raw, Mapping):
        raise LayerSpecError(f"{where}: a layer must be a mapping with a 'type', got {raw!r}")
    kind = raw.get("type")
    if kind not in LAYER_TYPES:
        raise LayerSpecError(f"{where}.type: must be one of {sorted(LAYER_TYPES)}, got {kind!r}")
    return LAYER_TYPES[kind].from_config({k: v for k, v in raw.items() if k != "type"}, where)


def parse_layers(raw: Any, where: str) -> list[Layer]:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise LayerSpecError(f"{where}: must be a non-empty list of layers, got {raw!r}")
    return [parse_layer(item, f"{where}[{i}]") for i, item in enumerate(raw)]


def build_chain(layers: list[Layer], builder: Builder, input_shape: Shape) -> Shape:
    for layer in layers:
        input_shape = layer.build(builder, input_shape)
    return input_shape


def forward_chain(layers: list[Layer], params: Mapping[str, Any], x: Any, run: Pass) -> tuple[Any, list]:
    caches = []
    for layer in layers:
        x, cache = layer.forward(params, x, run)
        caches.append(cache)
    return x, caches


def backward_chain(layers: list[Layer], params: Mapping[str, Any], caches: list, dy: Any, run: Pass,
                   need_dx: bool) -> Any:
    """Backward through ``layers`` in reverse; the first layer skips its input gradient unless ``need_dx``."""
    for index in reversed(range(len(layers))):
        dy = layers[index].backward(params, caches[index], dy, run, need_dx or index > 0)
    return dy

"""Job configuration: YAML -> validated, grouped, frozen pydantic models.

``load_config(path, overrides)`` composes the YAML into nodes (not plain objects) so
every value keeps the line it came from; pydantic validates the plain values against
``JobConfig``, and the first problem becomes ONE ``ConfigError`` naming the file, line
and dotted key, before anything is started or written. The models validate wherever
they are built (``JobConfig(...)`` in code raises ``ConfigError`` too), are frozen, and
``cfg.replace(train={"steps": 5})`` is the validated way to derive one from another.

Environment variable references (``${VAR}``, ``${oc.env:VAR}``, ``${oc.env:VAR,default}``)
are resolved at load time into an ``EnvValue`` (a ``str`` remembering its reference), so
``dump_config`` writes the reference back, never the value. Inside ``storage_options``
the value is a credential, a ``Secret``: it works wherever a string does (s3fs gets the
real key) but its ``repr`` shows only the reference, and ``redact`` removes it from free
text, for log handlers.

The models are the schema: ``json_schema()`` (``orchestrator schema``, docs/job.schema.json)
and docs/config.md (``scripts/gen_config_doc.py``) are generated from them.

Adding a key
------------
- A key: one line in its group, ``name: Type = _key(default, "one-line doc", rules.BOUND)``.
  Strings are ``Text`` (so a ``${VAR}`` in them is written back by ``dump_config``); enums are
  ``str`` Enums declared with ``_choice(...)``; a key without a default is required.
- A group: a ``_Group`` subclass whose docstring is its doc, added as a field of ``JobConfig``
  with ``Field(default_factory=...)``.
- A range rule: a ``Bound`` in ``orchestrator/rules.py`` when the library's Python API checks
  the same value (it calls ``rules.X.check(...)``), else ``Bound(...)`` inline.
- A rule over several keys: a ``@model_validator(mode="after")`` on the smallest group holding
  them, raising ``Problem(message, key=..., at=...)`` so the error points at the key to change.
- Then ``python scripts/gen_config_doc.py`` (docs/config.md and docs/job.schema.json) and a
  case in tests/test_config.py; docs/config.md says what each key does.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import enum
import json
import os
import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema

from orchestrator import rules
from orchestrator.errors import BadInputError
from orchestrator.rules import Bound

__all__ = [
    "ConfigError", "EnvValue", "Secret", "redact", "load_config", "dump_config", "config_to_dict", "parse_options",
    "json_schema", "JobConfig", "ModelConfig", "DataConfig", "OptimizerConfig", "TrainConfig", "WorkersConfig",
    "ResourcesConfig", "CheckpointConfig", "FaultToleranceConfig", "PreemptionNoticesConfig", "ClusterConfig",
    "LoggingConfig", "CodeConfig", "InitFromConfig", "DataFormat", "error_at", "Device", "ModelKind", "Activation", "Dataset",
    "OptimizerName",
    "BestMode", "LogLevel", "ProgressMode",
]


# ---------------------------------------------------------------------------- errors
class ConfigError(BadInputError, ValueError):
    """One problem in a job config, located by file (or ``--set`` argument), line and key."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 key: str | None = None):
        super().__init__(message)
        self.file, self.line, self.key = file, line, key

    def __reduce__(self):
        return (type(self), (self.message, self.file, self.line, self.key))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


@dataclass(frozen=True)
class _Loc:
    """Where a value came from: a file and 1-based line, or a ``--set`` argument."""

    file: str
    line: int | None = None

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(message, self.file, self.line, key)


class Problem(ValueError):
    """Raised by a model validator: ``message`` about ``key`` (relative to the group), whose
    error line is that of ``at`` (default: ``key`` itself)."""

    def __init__(self, message: str, key: str | None = None, at: str | None = None):
        super().__init__(message)
        self.message, self.key, self.at = message, key, at or key


# ---------------------------------------------------------------------------- secrets
_SECRET_VALUES: set[str] = set()
# Log lines are scrubbed of secrets by plain substring replacement; values shorter than this
# (a port, "true", a digit) would garble every line they occur in, and are no credential.
REDACT_MIN_CHARS = 6


class EnvValue(str):
    """A string resolved from environment references; remembers the ``${...}`` text it came from."""

    reference: str

    def __new__(cls, value: str, reference: str):
        obj = super().__new__(cls, value)
        obj.reference = reference
        return obj

    def __reduce__(self):
        return (type(self), (str.__str__(self), self.reference))


class Secret(EnvValue):
    """An ``EnvValue`` inside ``storage_options`` (credentials): masked in repr and in logs."""

    def __new__(cls, value: str, reference: str):
        obj = super().__new__(cls, value, reference)
        if len(value) >= REDACT_MIN_CHARS:
            _SECRET_VALUES.add(value)
        return obj

    def __repr__(self) -> str:
        return f"<secret {self.reference}>"


def redact(text: str) -> str:
    """``text`` with every resolved secret (env value inside storage_options) replaced by ``***``."""
    for value in sorted(_SECRET_VALUES, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


_ENV_REF = re.compile(r"\$\{(?:oc\.env:)?([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")


def _resolve_env(text: str, loc: _Loc, key: str, environ: Mapping[str, str], secret: bool) -> str:
    """Replace ``${VAR}`` / ``${oc.env:VAR[,default]}``; a string with none stays a plain str."""
    if "${" not in text:
        return text
    if "${" in _ENV_REF.sub("", text):
        raise loc.error(key, f"malformed reference in {text!r}: use ${{VAR}} or ${{oc.env:VAR,default}}")

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if default is not None and not match.group(0).startswith("${oc.env:"):
            raise loc.error(key, f"a default needs the ${{oc.env:{name},default}} form")
        if name in environ:
            return environ[name]
        if default is not None:
            return default.strip()
        raise loc.error(key, f"environment variable {name} is not set")

    kind = Secret if secret else EnvValue
    return kind(_ENV_REF.sub(substitute, text), text)


def _env_scalar(value: Any) -> Any:
    """An env value standing for a number or boolean is parsed by YAML scalar rules."""
    if not isinstance(value, EnvValue):
        return value
    try:
        parsed = yaml.safe_load(str.__str__(value))
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, (bool, int, float)) else value


# ---------------------------------------------------------------------------- enums
class Device(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"
    AUTO = "auto"


class ModelKind(str, enum.Enum):
    MLP = "mlp"
    SOFTMAX = "softmax"
    SEQUENTIAL = "sequential"
    TRANSFORMER = "transformer"


class Activation(str, enum.Enum):
    RELU = "relu"
    GELU = "gelu"


class Dataset(str, enum.Enum):
    DIGITS = "digits"
    MNIST = "mnist"
    SYNTHETIC = "synthetic"
    CHARS = "chars"


class DataFormat(str, enum.Enum):
    NPZ = "npz"
    NPY = "npy"
    PARQUET = "parquet"
    CSV = "csv"


class OptimizerName(str, enum.Enum):
    SGD = "sgd"
    MOMENTUM = "momentum"
    RMSPROP = "rmsprop"
    ADAM = "adam"


BestMode = enum.Enum("BestMode", {mode.upper(): mode for mode in rules.BEST_MODES}, type=str, module=__name__)
BestMode.__doc__ = "Whether a lower (min) or higher (max) best_metric is better."


class LogLevel(str, enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class ProgressMode(str, enum.Enum):
    AUTO = "auto"
    BAR = "bar"
    PLAIN = "plain"
    NONE = "none"


# ---------------------------------------------------------------------------- schema building blocks
def _keep_reference(value: Any, handler) -> Any:
    """Validate as a string, but hand back an ``EnvValue`` itself so its reference survives."""
    checked = handler(value)
    return value if isinstance(value, EnvValue) else checked


# A string key. Plain ``str`` would drop the ``${VAR}`` reference dump_config writes back.
Text = Annotated[str, WrapValidator(_keep_reference)]
# A plug-in factory key. The pattern sits inside the reference keeper: given on an Optional key's
# Field it is checked after the Optional and hands back a plain ``str`` (the ``${VAR}`` is lost).
FactoryText = Annotated[str, Field(pattern=rules.FACTORY), WrapValidator(_keep_reference)]

# Patterns and what "must be ..." says when a value does not match one.
_NAME = r"^(?!\.\.?$)[^/]*[^/\s][^/]*$"
_NOT_BLANK = r"\S"
_PATTERN_TEXT = {_NAME: "a name without '/' (not blank, '.' or '..')", _NOT_BLANK: "a non-blank string",
                 rules.FACTORY: rules.FACTORY_TEXT}


def _key(default: Any = ..., doc: str = "", bound: Bound | None = None, **kwargs: Any) -> Any:
    """A schema key: its default (``...`` = required), one-line doc and optional range."""
    limits = bound.limits() if bound else {}
    return Field(default, description=doc, **limits, **kwargs)  # a list or dict default is copied per model


def _choice(default: enum.Enum, doc: str) -> Any:
    """An enum key: YAML gives the value's text, so the enum is matched by value (lax)."""
    return Field(default, description=doc, strict=False)


# True while a validation that turns pydantic's errors into one ConfigError is under way.
_VALIDATING: contextvars.ContextVar[bool] = contextvars.ContextVar("_VALIDATING", default=False)


class _Group(BaseModel):
    """A group of keys: unknown keys rejected, exact types, frozen, finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              regex_engine="python-re", validate_default=False)

    def __init__(self, **data: Any):
        """Built in code: a problem is a ``ConfigError`` too (pydantic also calls this for nested
        groups; those errors travel up, with their path, to the outermost validation)."""
        if _VALIDATING.get():
            super().__init__(**data)
            return
        token = _VALIDATING.set(True)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc, type(self), lambda key: _Loc("<config>")) from None
        finally:
            _VALIDATING.reset(token)

    @model_validator(mode="before")
    @classmethod
    def _env_scalars(cls, data: Any) -> Any:
        """``seed: ${SEED}`` -> 7: an env value for a number or boolean key is parsed as YAML."""
        if not isinstance(data, dict):
            return data
        return {name: _env_scalar(value) if _is_scalar_key(cls.model_fields.get(name)) else value
                for name, value in data.items()}

    def replace(self, **changes: Any):
        """A validated copy with ``changes``; a mapping given for a group changes only its keys."""
        data = {name: getattr(self, name) for name in type(self).model_fields}
        for name, value in changes.items():
            current = data.get(name)
            if isinstance(current, _Group) and isinstance(value, Mapping):
                value = current.replace(**value)
            data[name] = value
        return type(self)(**data)


def _schema_if(present: dict, needed: dict) -> dict:
    """JSON Schema for "when these keys hold these values, those keys must be given like so"."""
    return {"if": {"properties": present, "required": list(present)},
            "then": {"properties": needed, "required": list(needed)}}


def _is_scalar_key(info: FieldInfo | None) -> bool:
    return info is not None and _unwrap_optional(info.annotation) in (int, float, bool)


# ---------------------------------------------------------------------------- schema
class ModelConfig(_Group):
    """The network trained."""

    model_config = ConfigDict(json_schema_extra={"allOf": [  # _layers_fit_kind, for editors
        _schema_if({"kind": {"const": "sequential"}}, {"layers": {"type": "array", "minItems": 1}}),
        {"if": {"properties": {"kind": {"const": "transformer"}}, "required": ["kind"]},
         "then": {"properties": {"layers": {"type": ["integer", "null"]}}}}]})

    kind: ModelKind = _choice(ModelKind.MLP, "network family")
    hidden: list[Annotated[int, Field(**rules.WIDTH.limits())]] = _key(
        [625, 625], "hidden layer widths (mlp only)", max_length=rules.MAX_LAYERS)
    activation: Activation = _choice(Activation.RELU, "hidden layer activation")
    keep_prob_input: float = _key(0.8, "dropout keep probability on the input", rules.PROBABILITY)
    keep_prob_hidden: float = _key(0.5, "dropout keep probability after each hidden layer", rules.PROBABILITY)
    layers: Optional[Union[int, list[dict[str, Any]]]] = _key(
        None, "sequential: the layer list ({type: conv2d, filters: 16, ...}, docs/layers.md); "
              "transformer: number of blocks (null = 2)")
    input_shape: Optional[list[Annotated[int, Field(**rules.WIDTH.limits())]]] = _key(
        None, "sequential: shape of one example, e.g. [8, 8, 1] for digits as images (null = the data's)",
        min_length=1, max_length=rules.MAX_LAYERS)
    vocab: Optional[int] = _key(None, "transformer: token ids in [0, vocab) (null = the dataset's vocabulary)",
                                rules.CLASSES)
    context: Optional[int] = _key(None, "transformer: positions per example (null = the data's; chars: "
                                        "data.context)", rules.WIDTH)
    d_model: int = _key(128, "transformer: width of the residual stream", rules.WIDTH)
    heads: int = _key(4, "transformer: attention heads (d_model must be a multiple)", rules.WIDTH)
    ff_dim: Optional[int] = _key(None, "transformer: feed-forward width (null = 4 * d_model)", rules.WIDTH)
    dropout: float = _key(0.1, "transformer: dropout rate (embeddings, attention, residual branches)",
                          rules.DROPOUT_RATE)
    factory: Optional[FactoryText] = _key(
        None, "plug-in model 'module:callable', called as build(*, input_shape, num_classes, backend, seed, "
              "**args); replaces kind and the keys above (docs/plugins.md)")
    args: dict[str, Any] = _key({}, "keyword arguments for model.factory")

    @model_validator(mode="before")
    @classmethod
    def _layers_fit_kind(cls, data: Any) -> Any:
        """``layers`` is a list for sequential, a block count for transformer (said before pydantic
        reports both union branches failing)."""
        if not isinstance(data, dict) or data.get("factory") or "layers" not in data:
            return data
        kind, layers = str(data.get("kind", ModelKind.MLP.value)), _env_scalar(data["layers"])
        if kind == ModelKind.SEQUENTIAL.value and not isinstance(layers, list):
            raise Problem(f"kind sequential needs a list of layers ({{type: dense, units: 64}}, ...), "
                          f"got {_type_name(layers)} {_show(layers)}", key="layers")
        if kind == ModelKind.TRANSFORMER.value and (isinstance(layers, bool) or not isinstance(layers, int)):
            raise Problem(f"kind transformer takes the number of blocks (an integer), got {_type_name(layers)} "
                          f"{_show(layers)}", key="layers")
        return data

    @model_validator(mode="after")
    def _kind_keys(self):
        """Keys of the layer-library kinds are for their kind only; sequential needs its layer list."""
        if self.factory:
            return self
        for key in sorted(self.model_fields_set & set(_KIND_KEYS)):   # given, and not the default
            if self.kind not in _KIND_KEYS[key] and getattr(self, key) != type(self).model_fields[key].default:
                kinds = " or ".join(k.value for k in _KIND_KEYS[key])
                raise Problem(f"applies to kind {kinds} only (kind is {self.kind.value})", key=key)
        if self.kind is ModelKind.SEQUENTIAL and not self.layers:
            raise Problem("kind sequential needs layers: a non-empty list of layers ({type: dense, units: 64}, ...)",
                          key="layers", at="kind" if self.layers is None else "layers")
        if self.kind is ModelKind.TRANSFORMER and self.layers is not None and not rules.WIDTH.holds(self.layers):
            raise Problem(rules.WIDTH.problem(self.layers), key="layers")
        return self


_KIND_KEYS = {"layers": (ModelKind.SEQUENTIAL, ModelKind.TRANSFORMER), "input_shape": (ModelKind.SEQUENTIAL,),
              **{key: (ModelKind.TRANSFORMER,) for key in ("vocab", "context", "d_model", "heads", "ff_dim",
                                                            "dropout")}}


class DataConfig(_Group):
    """Where training examples come from."""

    model_config = ConfigDict(json_schema_extra={"allOf": [  # _needs_path, for editors
        _schema_if({"dataset": {"const": "mnist"}}, {"path": {"type": "string", "minLength": 1}})]})

    dataset: Dataset = _choice(Dataset.DIGITS, "dataset: digits (bundled), mnist (IDX files), synthetic, chars "
                                               "(next-character windows of `path`, a UTF-8 text; null path = "
                                               "Python's pydoc topics)")
    format: Optional[DataFormat] = _choice(
        None, "data from files: npz, npy, parquet or csv at `path` (replaces dataset; docs/plugins.md)")
    path: Optional[Text] = _key(None, "mnist, chars or files: local path or fsspec URL (a directory of shard files for "
                                      "sharded parquet/npz)")
    features: Optional[Union[Text, list[Text]]] = _key(
        None, "files: the npz/npy key of the features, or the parquet/csv column(s) (null = x, or every "
              "column but `labels`)")
    labels: Optional[Text] = _key(None, "files: the npz/npy key or the parquet/csv column of the labels (null = y)")
    eval_path: Optional[Text] = _key(None, "files: the evaluation set, same format as `path`")
    eval_fraction: Optional[float] = _key(
        None, "files: hold out this fraction of `path` for evaluation (a fixed seeded split); chars: the "
              "text's last fraction (null = 0.1)", rules.FRACTION)
    factory: Optional[FactoryText] = _key(
        None, "plug-in data 'module:callable', called as load(*, seed, **args) -> "
              "(train_x, train_y, eval_x, eval_y)")
    args: dict[str, Any] = _key({}, "keyword arguments for data.factory")
    storage_options: dict[str, Any] = _key({}, "fsspec options for `path` (may hold ${VAR} references)")
    context: int = _key(64, "chars only: characters per example (the model predicts each next one)", rules.WIDTH)
    num_examples: int = _key(10000, "synthetic only: number of training examples", rules.EXAMPLES)
    input_dim: int = _key(784, "synthetic only: features per example", rules.WIDTH)
    num_classes: Optional[int] = _key(
        None, "number of classes; labels must lie in [0, num_classes) (null: 10 for synthetic, else the "
              "largest label + 1)", rules.CLASSES)
    global_batch_size: int = _key(128, "examples per global step, split across workers", rules.BATCH)

    @property
    def from_user(self) -> bool:
        """True when the data comes from files or a data factory (``dataset`` is not used)."""
        return bool(self.format or self.factory)

    @property
    def known_train_examples(self) -> int | None:
        """Training examples, where known without reading the data (None: mnist, counted before Ray
        starts; files and factories, counted once read)."""
        if self.from_user:
            return None
        return {Dataset.DIGITS: rules.DIGITS_TRAIN_EXAMPLES, Dataset.SYNTHETIC: self.num_examples}.get(self.dataset)

    @model_validator(mode="after")
    def _combinations(self):
        if self.factory and self.format:
            raise Problem("data.factory and data.format exclude each other: a factory returns arrays, "
                          "a format reads files", key="format")
        if self.format and not self.path:
            raise Problem(f"format {self.format.value} needs data.path: the file, directory or URL to read",
                          key="path", at="format")
        if self.eval_path and self.eval_fraction is not None:
            raise Problem("give data.eval_path or data.eval_fraction, not both", key="eval_fraction")
        if self.from_user:
            return self  # sizes are known once the data is read (preflight)
        # a key the dataset never reads would be ignored: a user who gave a path without data.format
        # would train on the bundled digits and exit 0
        if self.path is not None and self.dataset in (Dataset.DIGITS, Dataset.SYNTHETIC):
            raise Problem(f"dataset {self.dataset.value} reads no file; to train on your files, set data.format "
                          f"({', '.join(f.value for f in DataFormat)})", key="path")
        for key in ("features", "labels", "eval_path"):
            if getattr(self, key) is not None:
                raise Problem(f"applies to data.format (your files) only (dataset is {self.dataset.value})", key=key)
        if self.dataset is Dataset.MNIST and not self.path:
            raise Problem("dataset mnist needs data.path: the directory or URL of the IDX files",
                          key="path", at="dataset")
        too_big = self.dataset is Dataset.SYNTHETIC and rules.synthetic_problem(self.num_examples, self.input_dim)
        if too_big:
            raise Problem(too_big, key="num_examples")
        examples = self.known_train_examples
        too_large = examples is not None and rules.batch_problem(self.global_batch_size, examples)
        if too_large:
            raise Problem(too_large, key="global_batch_size")
        return self


class OptimizerConfig(_Group):
    """The update rule and its hyperparameters."""

    name: OptimizerName = _choice(OptimizerName.RMSPROP, "optimizer")
    learning_rate: float = _key(0.001, "learning rate", rules.LEARNING_RATE)
    momentum: float = _key(0.0, "momentum (momentum, rmsprop)", rules.DECAY)
    decay: float = _key(0.9, "rmsprop decay of the squared-gradient average", rules.DECAY)
    beta1: float = _key(0.9, "adam first-moment decay", rules.DECAY)
    beta2: float = _key(0.999, "adam second-moment decay", rules.DECAY)
    epsilon: float = _key(1.0e-10, "numerical stabiliser", rules.EPSILON)
    factory: Optional[FactoryText] = _key(
        None, "plug-in optimizer 'module:callable', called as build(*, learning_rate, **args); replaces name")
    args: dict[str, Any] = _key({}, "keyword arguments for optimizer.factory")


class TrainConfig(_Group):
    """How long to train and how often to report."""

    steps: int = _key(300, "total global steps", rules.STEPS)
    log_every_steps: int = _key(10, "steps between progress log lines", Bound(gt=0))
    eval_every_steps: int = _key(100, "steps between evaluations (0 = only at the end)", Bound(ge=0))


class WorkersConfig(_Group):
    """Number of Ray worker actors: `workers: N` means {min: N, max: N}; `{min: a, max: b}` is elastic
    (a mapping with only one of the two uses it for both)."""

    min: int = _key(2, "fewest workers the job runs with", rules.WORKERS)
    max: int = _key(2, "workers started when resources allow", rules.WORKERS)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``workers: N`` -> {min: N, max: N}; ``{min: a}`` -> {min: a, max: a} (and the reverse)."""
        data = _env_scalar(data)
        if isinstance(data, int) and not isinstance(data, bool):
            if not rules.WORKERS.holds(data):
                raise Problem(rules.WORKERS.problem(data))
            return {"min": data, "max": data}
        if isinstance(data, dict):
            if "min" in data and "max" not in data:
                return {**data, "max": data["min"]}
            if "max" in data and "min" not in data:
                return {**data, "min": data["max"]}
            return data
        if isinstance(data, WorkersConfig):
            return data
        raise Problem(f"expected an integer or {{min: N, max: M}}, got {_type_name(data)} {_show(data)}")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise Problem(rules.min_exceeds_max(self.min, self.max), key="min")
        return self


class ResourcesConfig(_Group):
    """Ray resources requested per worker actor."""

    cpus_per_worker: float = _key(1.0, "Ray num_cpus per worker actor", Bound(ge=0))
    gpus_per_worker: Optional[float] = _key(
        None, "Ray num_gpus per worker; null = 1 if device is gpu else 0", Bound(ge=0))


class CheckpointConfig(_Group):
    """Where and how often checkpoints are written, and which are kept."""

    model_config = ConfigDict(json_schema_extra={"allOf": [  # _combinations, for editors
        _schema_if({"save_every_steps": {"const": 0}}, {"save_every_secs": {"type": "number"}}),
        _schema_if({"keep_best": {"type": "integer"}}, {"best_metric": {"type": "string", "minLength": 1}})]})

    dir: Text = _key(..., "local path or fsspec URL (s3://..., gs://...) of the checkpoint directory",
                     pattern=_NOT_BLANK)
    storage_options: dict[str, Any] = _key(
        {}, "fsspec options for `dir`; may hold ${VAR} references, never written back")
    save_every_steps: int = _key(100, "steps between checkpoints (0 = off)", Bound(ge=0))
    save_every_secs: Optional[float] = _key(None, "seconds between checkpoints (null = off)", Bound(gt=0))
    max_to_keep: Optional[int] = _key(5, "most recent checkpoints kept (0 or null = keep all)", rules.MAX_TO_KEEP)
    keep_checkpoint_every_n_hours: Optional[float] = _key(
        None, "also keep one checkpoint per this many hours", rules.KEEP_EVERY_N_HOURS)
    best_metric: Optional[Text] = _key(None, "metric used for best-k retention, e.g. loss or accuracy")
    best_mode: BestMode = _choice(BestMode.MIN, "min: lower best_metric is better; max: higher is better")
    keep_best: Optional[int] = _key(None, "keep the k best checkpoints by best_metric", rules.KEEP_BEST)
    memory_every_steps: int = _key(
        0, "steps between in-memory checkpoints, kept only in the workers' memory and a peer's (0 = only the "
           "snapshot of each save): a worker failure then loses at most this many steps", Bound(ge=0))
    async_save: bool = _key(True, "write checkpoints in the background while training continues")
    fsync: bool = _key(True, "fsync data files before the checkpoint is committed")
    max_consecutive_failures: int = _key(
        3, "saves in a row that may fail (each keeps the previous checkpoint as latest) before the job stops "
           "with exit 1", Bound(ge=1))
    lease_timeout_s: float = _key(
        60.0, "object stores: a run's lease on checkpoint.dir is taken over after this long without a heartbeat "
              "(local directories use a lock the OS releases when the run ends)", Bound(gt=0))

    @model_validator(mode="after")
    def _combinations(self):
        if not self.save_every_steps and self.save_every_secs is None:
            raise Problem("checkpointing is off: set save_every_steps > 0 or save_every_secs",
                          key="save_every_steps")
        if self.keep_best is not None and not self.best_metric:
            raise Problem(rules.KEEP_BEST_NEEDS_METRIC, key="keep_best")
        return self


class PreemptionNoticesConfig(_Group):
    """Which preemption notices end the job with an emergency checkpoint (exit 3) before the machine goes.
    SIGTERM/SIGINT and `preemption_notice_file` are always on; each cloud source is opt-in."""

    gce: bool = _key(False, "poll the GCE metadata server (instance/preempted, instance/maintenance-event)")
    aws: bool = _key(False, "poll EC2 IMDSv2 spot/instance-action (session-token flow)")
    azure: bool = _key(False, "poll Azure Scheduled Events for a Preempt or Terminate event of this VM")
    kubernetes: bool = _key(False, "SIGTERM comes from Kubernetes: the deadline is kubernetes_grace_period_s after it")
    ray_drain: bool = _key(True, "act on a Ray drain of a node hosting workers, by its deadline")
    poll_interval_s: float = _key(1.0, "seconds between two polls of each metadata service", Bound(gt=0))
    kubernetes_grace_period_s: float = _key(30.0, "the pod's terminationGracePeriodSeconds", Bound(gt=0))
    gce_endpoint: Text = _key("http://metadata.google.internal/computeMetadata/v1", "GCE metadata base URL",
                              pattern=_NOT_BLANK)
    aws_endpoint: Text = _key("http://169.254.169.254", "EC2 instance metadata base URL", pattern=_NOT_BLANK)
    azure_endpoint: Text = _key("http://169.254.169.254", "Azure instance metadata base URL", pattern=_NOT_BLANK)


class FaultToleranceConfig(_Group):
    """How failures and preemption are handled."""

    max_failures: int = _key(3, "restarts allowed over the job (-1 = unlimited)", rules.MAX_FAILURES)
    backoff_s: float = _key(1.0, "base wait before a restart", rules.BACKOFF_S)
    step_timeout_s: float = _key(120.0, "a step slower than this counts as a worker failure", Bound(gt=0))
    grace_period_s: float = _key(30.0, "time allowed for the emergency checkpoint on preemption", Bound(gt=0))
    preemption_notice_file: Optional[Text] = _key(None, "a file whose appearance announces preemption")
    min_workers_timeout_s: float = _key(60.0, "how long to wait for workers.min workers to be placed", Bound(ge=0))
    spare_workers: int = _key(
        0, "workers started ahead and kept idle (each holds one worker's resources) that take a lost worker's place "
           "without a process start; kept while the job runs workers.max workers", Bound(ge=0))
    preemption_notices: PreemptionNoticesConfig = Field(default_factory=PreemptionNoticesConfig)


class ClusterConfig(_Group):
    """Which Ray cluster runs the job."""

    address: Optional[Text] = _key(
        None, 'Ray address; null = RAY_ADDRESS or an in-process local Ray; "auto" joins the local cluster')
    num_cpus: Optional[int] = _key(
        None, "in-process Ray only: logical CPUs (null = max(8, workers.max * cpus_per_worker))", Bound(gt=0))


class CodeConfig(_Group):
    """Plug-in code shipped to every worker through Ray's runtime_env (when a factory is configured)."""

    paths: list[Text] = _key(
        [], "packages or .py files to ship (Ray py_modules) instead of the job directory (empty = ship the "
            "directory the job runs in)")
    excludes: list[Text] = _key([], "more gitignore-style patterns not to ship (.git, runs/, checkpoints never are)")
    max_size_mb: float = _key(100.0, "refuse to ship more than this many MiB (after excludes)", rules.CODE_MB)


class LoggingConfig(_Group):
    """What the operator sees."""

    level: LogLevel = _choice(LogLevel.INFO, "log level")
    progress: ProgressMode = _choice(ProgressMode.AUTO, "auto: live line on a terminal, plain lines otherwise")
    tensorboard: bool = _key(True, "write TensorBoard event files under <run_dir>/tensorboard")


class InitFromConfig(_Group):
    """Warm start: take model variables from another checkpoint (ours, TensorFlow's, or an exported
    .safetensors file), initialise the rest, start at step 0 with fresh optimizer state. Applies only
    when the job starts without a checkpoint of its own (a rerun resumes from checkpoint.dir)."""

    checkpoint: Text = _key(..., "checkpoint prefix, directory (its latest) or .safetensors file; local path or "
                                 "fsspec URL", pattern=_NOT_BLANK)
    variables: list[Text] = _key(["*"], "globs over the model's variable names to take from the checkpoint (the "
                                        "others start fresh)", min_length=1, max_length=rules.MAX_LAYERS * 16)
    rename: dict[Text, Text] = _key({}, "{checkpoint name: model variable name} for tensors saved under another name")
    storage_options: dict[str, Any] = _key({}, "fsspec options for `checkpoint` (may hold ${VAR} references)")


class JobConfig(_Group):
    """One training job."""

    name: Text = _key(..., "job name", pattern=_NAME)
    run_dir: Optional[Text] = _key(
        None, "local directory for logs, TensorBoard events and the run summary (null = runs/<name>)")
    seed: int = _key(0, "seed of initialisation, data order and dropout", Bound(ge=0))
    device: Device = _choice(Device.CPU, "where steps run: cpu, gpu or auto")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = Field(description="checkpointing")
    fault_tolerance: FaultToleranceConfig = Field(default_factory=FaultToleranceConfig)
    resume: Text = _key("auto", "auto (latest checkpoint in checkpoint.dir), never, or a checkpoint prefix/directory",
                        pattern=_NOT_BLANK)
    init_from: Optional[InitFromConfig] = _key(
        None, "warm start from another checkpoint (see init_from below; null = initialise every variable)")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    code: CodeConfig = Field(default_factory=CodeConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_run_dir(cls, data: Any) -> Any:
        """run_dir null -> runs/<name>."""
        if isinstance(data, dict) and data.get("run_dir") is None and isinstance(data.get("name"), str):
            return {**data, "run_dir": os.path.join("runs", data["name"])}
        return data

    @model_validator(mode="after")
    def _one_start(self):
        if self.init_from is not None and self.resume not in ("auto", "never"):
            raise Problem("resume: <checkpoint> continues that run; init_from starts a new one from another "
                          "checkpoint's variables: give one of them", key="init_from")
        return self


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _group_of(tp: Any) -> type[_Group] | None:
    tp = _unwrap_optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, _Group) else None


# What a ``${VAR}`` reference looks like to the schema (the loader resolves it before validation).
_ENV_REF_SCHEMA = {"type": "string", "pattern": r"\$\{[^}]+\}"}


class _SchemaGenerator(GenerateJsonSchema):
    """Pydantic's JSON Schema without per-key titles (the descriptions say more)."""

    def field_title_should_be_set(self, schema) -> bool:
        return False


def json_schema() -> dict:
    """The JSON Schema of a job YAML file (what editors validate and complete against).

    Beyond pydantic's: ``workers`` also takes an integer, and a number or boolean key also
    takes a ``${VAR}`` reference (resolved, then checked, when the config loads).
    """
    schema = JobConfig.model_json_schema(schema_generator=_SchemaGenerator)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    schema["properties"]["workers"] = {
        "anyOf": [{"type": "integer", **_json_limits(rules.WORKERS)}, {"$ref": "#/$defs/WorkersConfig"}],
        "description": "N workers, or {min, max} for an elastic job"}
    for group in [schema, *schema["$defs"].values()]:
        for name, prop in group.get("properties", {}).items():
            group["properties"][name] = _env_allowed(prop)
    return schema


def _json_limits(bound: Bound) -> dict:
    names = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}
    return {names[end]: value for end, value in bound.limits().items()}


def _env_allowed(prop: dict) -> dict:
    """A number/boolean key's schema, widened to also take a ``${VAR}`` reference."""
    kinds = [prop.get("type")] + [option.get("type") for option in prop.get("anyOf", [])]
    if not {"integer", "number", "boolean"} & set(kinds):
        return prop
    meta = {k: prop.pop(k) for k in ("default", "description") if k in prop}
    options = prop.pop("anyOf", None) or [prop]
    return {"anyOf": [*options, _ENV_REF_SCHEMA], **meta}


def schema_text() -> str:
    """``json_schema()`` as the text of docs/job.schema.json."""
    return json.dumps(json_schema(), indent=2) + "\n"


# ---------------------------------------------------------------------------- YAML -> located tree
# Bounds on the YAML itself. A job config is a few hundred values in a few KiB; these stop,
# with a located error, input that would exhaust memory or time before anything is checked:
# a huge file, a "billion laughs" of nested aliases, nesting that overflows the composer's recursion.
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 32
MAX_VALUES = 10_000


@dataclass
class _Tree:
    """Plain values composed from YAML, plus where each dotted key was written."""

    values: dict
    locs: dict[str, _Loc]
    root: _Loc
    count: int = 0  # values built so far, aliases expanded

    def at(self, key: str) -> _Loc:
        """Where ``key`` (or the closest enclosing key that was written) came from."""
        key = re.sub(r"\[\d+\]", "", key)
        while key and key not in self.locs:
            key = key.rpartition(".")[0]
        return self.locs.get(key, self.root)


def _compose(text: str, file: str) -> yaml.Node | None:
    try:
        _check_nesting(text, file)
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise ConfigError(f"invalid YAML: {problem}", file, line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file) from None


def _check_nesting(text: str, file: str) -> None:
    """Stop at the first mapping or list nested deeper than MAX_NESTING, reading events only
    that far (the composer recurses once per level, and the scanner slows down with depth)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise ConfigError(f"nested deeper than {MAX_NESTING} levels", file, event.start_mark.line + 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _node_value(node: yaml.Node, key: str, tree: _Tree, loc: _Loc, environ, secret: bool = False,
                depth: int = 0) -> Any:
    """Plain Python value of ``node``; mappings record each key's location in ``tree.locs``.

    Env references under a ``storage_options`` key (or anywhere when ``secret``) become Secrets.
    An alias is expanded where it is used, so the values built are counted (and their depth
    bounded, for an alias inside its own anchor): nested aliases cannot multiply without limit.
    """
    tree.count += 1
    if tree.count > MAX_VALUES:
        raise loc.error(key or None, f"more than {MAX_VALUES} values (aliases expanding without limit?)")
    if depth > MAX_NESTING:
        raise loc.error(key or None, f"nested deeper than {MAX_NESTING} levels (an alias inside its own anchor?)")
    secret = secret or "storage_options" in key.split(".")
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            name = _scalar(key_node, loc)
            here = dataclasses.replace(loc, line=key_node.start_mark.line + 1) if loc.line else loc
            if not isinstance(name, str):  # `1:` or `yes:` would reach pydantic / **kwargs as a non-str key
                raise here.error(key or None, f"a key must be a string, got {_type_name(name)} {name!r} "
                                              f"(quote it: '{key_node.value}')")
            path = f"{key}.{name}" if key else str(name)
            if name in out:
                raise here.error(path, "duplicate key")
            tree.locs[path] = here
            out[name] = _node_value(value_node, path, tree, here, environ, secret, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_value(item, key, tree, loc, environ, secret, depth + 1) for item in node.value]
    value = _scalar(node, loc)
    return _resolve_env(value, loc, key, environ, secret) if isinstance(value, str) else value


def _scalar(node: yaml.Node, loc: _Loc) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise loc.error(None, "mapping keys must be plain scalars")
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except yaml.YAMLError as exc:
        raise loc.error(None, f"invalid value: {exc}") from None


def _read_text(path: str) -> str:
    """The file's text, refused beyond MAX_CONFIG_BYTES without reading further."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("config file not found", path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc}", path) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a job config", path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file: {exc}", path) from None


def _read_tree(path: str, environ) -> _Tree:
    node = _compose(_read_text(path), path)
    root = _Loc(path, 1)
    tree = _Tree({}, {}, root)
    if node is None:
        return tree
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("the top level must be a mapping of keys to values", path, node.start_mark.line + 1)
    tree.values = _node_value(node, "", tree, root, environ)
    return tree


# ---------------------------------------------------------------------------- --set overrides
def _apply_override(tree: _Tree, arg: str, environ, flag: str = "--set", secret: bool = False) -> None:
    """Merge one ``a.b=value`` into the tree; the value follows YAML scalar rules."""
    loc = _Loc(f"{flag} {arg}")
    key, sep, text = arg.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise loc.error(None, "expected KEY=VALUE with a dotted key, e.g. train.steps=500")
    node = _compose(text, loc.file) if text.strip() else yaml.ScalarNode("tag:yaml.org,2002:null", "")
    sub = _Tree({}, {}, loc)
    value = _node_value(node, key, sub, loc, environ, secret) if node is not None else None
    parent = tree.values
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        parent = _child_mapping(parent, part)
        tree.locs.setdefault(".".join(parts[: i + 1]), loc)
    parent[parts[-1]] = value
    _relocate(tree, key, loc)
    tree.locs.update(sub.locs)


def _child_mapping(parent: dict, part: str) -> dict:
    """The mapping under ``part``, created if absent; ``workers: N`` becomes {min: N, max: N}."""
    child = parent.get(part)
    if part == "workers" and isinstance(child, int) and not isinstance(child, bool):
        child = {"min": child, "max": child}
    if not isinstance(child, dict):
        child = {}
    parent[part] = child
    return child


def _relocate(tree: _Tree, key: str, loc: _Loc) -> None:
    """Everything at or under an overridden key now comes from the ``--set`` argument."""
    for path in [p for p in tree.locs if p == key or p.startswith(key + ".")]:
        tree.locs[path] = loc
    tree.locs[key] = loc


# ---------------------------------------------------------------------------- pydantic errors -> ConfigError
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean (true/false)",
             "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
             "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys"}
_BOUND_ERRORS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _config_error(exc: ValidationError, model: type[_Group], where) -> ConfigError:
    """The first problem pydantic found, in our words, located by ``where(dotted_key)``."""
    error = exc.errors(include_url=False)[0]
    loc = [part for part in error["loc"] if part != "[key]"]
    message, loc, at = _describe(error, loc, model)
    key = _dotted(loc)
    return where(_dotted(at) if at is not None else key).error(key or None, message)


def _dotted(loc: Sequence) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(error: dict, loc: list, model: type[_Group]) -> tuple[str, list, list | None]:
    """(message, key path, path whose line to show or None) for one pydantic error."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    problem = ctx.get("error")
    if kind == "value_error" and isinstance(problem, Problem):
        at = loc + problem.at.split(".") if problem.at else None
        return problem.message, loc + (problem.key.split(".") if problem.key else []), at
    if kind == "missing":
        return "missing required key", loc, None
    if kind == "extra_forbidden":
        return "unknown key" + _suggest(str(loc[-1]), _model_at(model, loc[:-1])), loc, None
    if kind in _EXPECTED:
        what = _EXPECTED[kind]
        if value is None:
            return f"must not be null (expected {what})", loc, None
        return f"expected {what}, got {_type_name(value)} {_show(value)}", loc, None
    if kind == "enum":
        return _enum_message(_field_at(model, loc), value), loc, None
    if kind in _BOUND_ERRORS:
        return _bound_at(model, loc, Bound(**{_BOUND_ERRORS[kind]: ctx[_BOUND_ERRORS[kind]]})).problem(value), loc, None
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items (got {ctx.get('actual_length')})", loc, None
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s) (got {ctx.get('actual_length')})", loc, None
    if kind == "finite_number":
        return f"must be a finite number (got {_show(value)})", loc, None
    if kind == "string_pattern_mismatch":
        return f"must be {_PATTERN_TEXT.get(ctx.get('pattern'), 'a matching string')} (got {_show(value)})", loc, None
    return str(problem) if problem is not None else error["msg"], loc, None


def _model_at(model: type[_Group], loc: Sequence) -> type[_Group] | None:
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        model = _group_of(info.annotation) if info is not None else None
        if model is None:
            return None
    return model


def _field_at(model: type[_Group], loc: Sequence) -> FieldInfo | None:
    parent = _model_at(model, loc[:-1]) if loc else None
    return parent.model_fields.get(loc[-1]) if parent is not None and isinstance(loc[-1], str) else None


def _bound_at(model: type[_Group], loc: Sequence, fallback: Bound) -> Bound:
    """The whole range of the key (or list item) at ``loc``: pydantic reports only the end that failed."""
    item = bool(loc) and isinstance(loc[-1], int)
    info = _field_at(model, loc[:-1] if item else loc)
    if info is None:
        return fallback
    metadata = list(info.metadata)
    if item:  # list[Annotated[int, Field(...)]]: the limits sit on the item type
        inner = typing.get_args(info.annotation)[0] if typing.get_args(info.annotation) else None
        metadata = [m for extra in typing.get_args(inner)[1:] for m in getattr(extra, "metadata", [extra])]
    ends = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in metadata
            if type(m).__name__ in ("Gt", "Ge", "Lt", "Le")}
    return Bound(**ends) if ends else fallback


def _enum_message(info: FieldInfo | None, value: Any) -> str:
    choices = [m.value for m in _unwrap_optional(info.annotation)] if info is not None else []
    hint = difflib.get_close_matches(str(value), choices, n=1)
    extra = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"must be one of {', '.join(choices)} (got {_show(value)}){extra}"


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
             dict: "mapping", type(None): "null"}
    return names.get(type(value), "string" if isinstance(value, str) else type(value).__name__)


def _show(value: Any) -> str:
    if isinstance(value, Secret):
        return repr(value)
    text = repr(str.__str__(value)) if isinstance(value, EnvValue) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _suggest(name: str, group: type[_Group] | None) -> str:
    """A "did you mean" for an unknown key: a close key in the same group, else one elsewhere."""
    known = list(group.model_fields) if group is not None else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    everywhere = _all_keys()
    elsewhere = [path for path, leaf in everywhere.items() if leaf == name]
    elsewhere = elsewhere or difflib.get_close_matches(name, list(everywhere), n=1, cutoff=0.75)
    if elsewhere:
        return f"; did you mean {elsewhere[0]!r}?"
    return f"; known keys: {', '.join(known)}" if known else ""


def _all_keys(group: type[_Group] | None = None, prefix: str = "") -> dict[str, str]:
    """Every dotted schema key (groups nested in groups included) -> its last component."""
    out = {}
    for name, info in (group or JobConfig).model_fields.items():
        out[prefix + name] = name
        inner = _group_of(info.annotation)
        if inner is not None:
            out.update(_all_keys(inner, f"{prefix}{name}."))
    return out


# ---------------------------------------------------------------------------- public API
def load_config(path: str | os.PathLike, overrides: Sequence[str] = (),
                environ: Mapping[str, str] | None = None) -> JobConfig:
    """Load and validate a job config; raises ConfigError (one problem, located) on bad input.

    Reads only ``path`` and the environment: nothing is created or written.
    """
    environ = os.environ if environ is None else environ
    tree = _read_tree(os.fspath(path), environ)
    for arg in overrides:
        _apply_override(tree, arg, environ)
    token = _VALIDATING.set(True)
    try:
        return JobConfig.model_validate(tree.values)
    except ValidationError as exc:
        raise _config_error(exc, JobConfig, tree.at) from None
    finally:
        _VALIDATING.reset(token)


def error_at(path: str | os.PathLike, overrides: Sequence[str], key: str | None, message: str,
             environ: Mapping[str, str] | None = None) -> ConfigError:
    """A ``ConfigError`` for a problem found after loading (a plug-in, the data), located at the
    line of ``key`` in the file (or the ``--set`` that gave it), else at its nearest parent key."""
    environ = os.environ if environ is None else environ
    tree = _read_tree(os.fspath(path), environ)
    for arg in overrides:
        _apply_override(tree, arg, environ)
    return tree.at(key or "").error(key, message)


def config_to_dict(cfg: Any, reveal: bool = False) -> Any:
    """Plain YAML-able data; env-resolved values become their ``${VAR}`` reference unless ``reveal``."""
    if isinstance(cfg, BaseModel):
        return {name: config_to_dict(getattr(cfg, name), reveal) for name in type(cfg).model_fields}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, EnvValue):
        return str.__str__(cfg) if reveal else cfg.reference
    if isinstance(cfg, str):
        return str.__str__(cfg)
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v, reveal) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v, reveal) for v in cfg]
    return cfg


def dump_config(cfg: JobConfig) -> str:
    """The config as YAML, with ``${VAR}`` references in place of resolved secrets."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def parse_options(items: Sequence[str], flag: str = "--storage-option") -> dict[str, Any]:
    """``["a.b=1", "key=${VAR}"]`` -> ``{"a": {"b": 1}, "key": Secret(...)}``.

    Values follow YAML scalar rules and may hold environment references, like config values.
    """
    tree = _Tree({}, {}, _Loc(flag))
    for item in items:
        _apply_override(tree, item, os.environ, flag, secret=True)
    return tree.values

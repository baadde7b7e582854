"""Job configuration: YAML -> validated, grouped, frozen dataclasses.

``load_config(path, overrides)`` composes the YAML into nodes (not plain objects) so
every value keeps the line it came from; each problem then becomes ONE ``ConfigError``
naming the file, line and dotted key, before anything is started or written.

Environment variable references (``${VAR}``, ``${oc.env:VAR}``, ``${oc.env:VAR,default}``)
are resolved at load time into an ``EnvValue`` (a ``str`` remembering its reference), so
``dump_config`` writes the reference back, never the value. Inside ``storage_options``
the value is a credential, a ``Secret``: it works wherever a string does (s3fs gets the
real key) but its ``repr`` shows only the reference, and ``redact`` removes it from free
text, for log handlers.

The schema is the dataclasses below; each field's metadata holds its doc and its rule,
and ``scripts/gen_config_doc.py`` renders docs/config.md from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import yaml

__all__ = [
    "ConfigError", "EnvValue", "Secret", "redact", "load_config", "dump_config", "config_to_dict", "parse_options",
    "JobConfig", "ModelConfig", "DataConfig", "OptimizerConfig", "TrainConfig", "WorkersConfig",
    "ResourcesConfig", "CheckpointConfig", "FaultToleranceConfig", "ClusterConfig",
    "LoggingConfig", "Device", "ModelKind", "Activation", "Dataset", "OptimizerName",
    "BestMode", "LogLevel", "ProgressMode",
]


# ---------------------------------------------------------------------------- errors
class ConfigError(ValueError):
    """One problem in a job config, located by file (or ``--set`` argument), line and key."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 key: str | None = None):
        super().__init__(message)
        self.message, self.file, self.line, self.key = message, file, line, key

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


# ---------------------------------------------------------------------------- enums
class Device(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"
    AUTO = "auto"


class ModelKind(str, enum.Enum):
    MLP = "mlp"
    SOFTMAX = "softmax"


class Activation(str, enum.Enum):
    RELU = "relu"
    GELU = "gelu"


class Dataset(str, enum.Enum):
    DIGITS = "digits"
    MNIST = "mnist"
    SYNTHETIC = "synthetic"


class OptimizerName(str, enum.Enum):
    SGD = "sgd"
    MOMENTUM = "momentum"
    RMSPROP = "rmsprop"
    ADAM = "adam"


class BestMode(str, enum.Enum):
    MIN = "min"
    MAX = "max"


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


# ---------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """A range check on one value; ``text`` completes "must be ..."."""

    text: str
    check: Callable[[Any], bool]


def _ge(lo) -> Rule:
    return Rule(f">= {lo}", lambda v: v >= lo)


def _gt(lo) -> Rule:
    return Rule(f"> {lo}", lambda v: v > lo)


def _prob() -> Rule:
    return Rule("in (0, 1]", lambda v: 0 < v <= 1)


def _unit() -> Rule:
    return Rule("in [0, 1)", lambda v: 0 <= v < 1)


def _each_gt(lo) -> Rule:
    return Rule(f"a list of integers > {lo}", lambda v: all(x > lo for x in v))


def _opt(default, doc: str, rule: Rule | None = None, *, required: bool = False):
    """A schema field: its default, one-line doc and optional range rule."""
    meta = {"doc": doc, "rule": rule, "required": required}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class ModelConfig:
    """The network trained."""

    kind: ModelKind = _opt(ModelKind.MLP, "network family")
    hidden: list[int] = _opt([625, 625], "hidden layer widths (mlp only)", _each_gt(0))
    activation: Activation = _opt(Activation.RELU, "hidden layer activation")
    keep_prob_input: float = _opt(0.8, "dropout keep probability on the input", _prob())
    keep_prob_hidden: float = _opt(0.5, "dropout keep probability after each hidden layer", _prob())


@dataclass(frozen=True)
class DataConfig:
    """Where training examples come from."""

    dataset: Dataset = _opt(Dataset.DIGITS, "dataset: digits (bundled), mnist (IDX files), synthetic")
    path: Optional[str] = _opt(None, "mnist: directory or URL holding the IDX files (required for mnist)")
    storage_options: dict[str, Any] = _opt({}, "fsspec options for `path` (may hold ${VAR} references)")
    num_examples: int = _opt(10000, "synthetic only: number of training examples", _gt(0))
    input_dim: int = _opt(784, "synthetic only: features per example", _gt(0))
    num_classes: int = _opt(10, "synthetic only: number of classes", _ge(2))
    global_batch_size: int = _opt(128, "examples per global step, split across workers", _gt(0))


@dataclass(frozen=True)
class OptimizerConfig:
    """The update rule and its hyperparameters."""

    name: OptimizerName = _opt(OptimizerName.RMSPROP, "optimizer")
    learning_rate: float = _opt(0.001, "learning rate", _gt(0))
    momentum: float = _opt(0.0, "momentum (momentum, rmsprop)", _unit())
    decay: float = _opt(0.9, "rmsprop decay of the squared-gradient average", _unit())
    beta1: float = _opt(0.9, "adam first-moment decay", _unit())
    beta2: float = _opt(0.999, "adam second-moment decay", _unit())
    epsilon: float = _opt(1.0e-10, "numerical stabiliser", _gt(0))


@dataclass(frozen=True)
class TrainConfig:
    """How long to train and how often to report."""

    steps: int = _opt(300, "total global steps", _gt(0))
    log_every_steps: int = _opt(10, "steps between progress log lines", _gt(0))
    eval_every_steps: int = _opt(100, "steps between evaluations (0 = only at the end)", _ge(0))


@dataclass(frozen=True)
class WorkersConfig:
    """Number of Ray worker actors: `workers: N` means {min: N, max: N}; `{min: a, max: b}` is elastic
    (a mapping with only one of the two uses it for both)."""

    min: int = _opt(2, "fewest workers the job runs with", _ge(1))
    max: int = _opt(2, "workers started when resources allow", _ge(1))


@dataclass(frozen=True)
class ResourcesConfig:
    """Ray resources requested per worker actor."""

    cpus_per_worker: float = _opt(1.0, "Ray num_cpus per worker actor", _ge(0))
    gpus_per_worker: Optional[float] = _opt(None, "Ray num_gpus per worker; null = 1 if device is gpu else 0", _ge(0))


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often checkpoints are written, and which are kept."""

    dir: str = _opt(None, "local path or fsspec URL (s3://..., gs://...) of the checkpoint directory",
                    required=True)
    storage_options: dict[str, Any] = _opt({}, "fsspec options for `dir`; may hold ${VAR} references, never written back")
    save_every_steps: int = _opt(100, "steps between checkpoints (0 = off)", _ge(0))
    save_every_secs: Optional[float] = _opt(None, "seconds between checkpoints (null = off)", _gt(0))
    max_to_keep: Optional[int] = _opt(5, "most recent checkpoints kept (0 or null = keep all)", _ge(0))
    keep_checkpoint_every_n_hours: Optional[float] = _opt(None, "also keep one checkpoint per this many hours", _gt(0))
    best_metric: Optional[str] = _opt(None, "metric used for best-k retention, e.g. loss or accuracy")
    best_mode: BestMode = _opt(BestMode.MIN, "min: lower best_metric is better; max: higher is better")
    keep_best: Optional[int] = _opt(None, "keep the k best checkpoints by best_metric", _ge(1))
    async_save: bool = _opt(True, "write checkpoints in the background while training continues")
    fsync: bool = _opt(True, "fsync data files before the checkpoint is committed")


@dataclass(frozen=True)
class FaultToleranceConfig:
    """How failures and preemption are handled."""

    max_failures: int = _opt(3, "restarts allowed over the job (-1 = unlimited)", _ge(-1))
    backoff_s: float = _opt(1.0, "base wait before a restart", _ge(0))
    step_timeout_s: float = _opt(120.0, "a step slower than this counts as a worker failure", _gt(0))
    grace_period_s: float = _opt(30.0, "time allowed for the emergency checkpoint on preemption", _gt(0))
    preemption_notice_file: Optional[str] = _opt(None, "a file whose appearance announces preemption")
    min_workers_timeout_s: float = _opt(60.0, "how long to wait for workers.min workers to be placed", _ge(0))


@dataclass(frozen=True)
class ClusterConfig:
    """Which Ray cluster runs the job."""

    address: Optional[str] = _opt(
        None, 'Ray address; null = RAY_ADDRESS or an in-process local Ray; "auto" joins the local cluster')
    num_cpus: Optional[int] = _opt(
        None, "in-process Ray only: logical CPUs (null = max(8, workers.max * cpus_per_worker))", _gt(0))


@dataclass(frozen=True)
class LoggingConfig:
    """What the operator sees."""

    level: LogLevel = _opt(LogLevel.INFO, "log level")
    progress: ProgressMode = _opt(ProgressMode.AUTO, "auto: live line on a terminal, plain lines otherwise")
    tensorboard: bool = _opt(True, "write TensorBoard event files under <run_dir>/tensorboard")


@dataclass(frozen=True)
class JobConfig:
    """One training job."""

    name: str = _opt(None, "job name", required=True)
    run_dir: Optional[str] = _opt(
        None, "local directory for logs, TensorBoard events and the run summary (null = runs/<name>)")
    seed: int = _opt(0, "seed of initialisation, data order and dropout", _ge(0))
    device: Device = _opt(Device.CPU, "where steps run: cpu, gpu or auto")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = _opt(None, "checkpointing", required=True)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    resume: str = _opt("auto", "auto (latest checkpoint in checkpoint.dir), never, or a checkpoint prefix/directory")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def is_group(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


# ---------------------------------------------------------------------------- YAML -> located tree
@dataclass
class _Tree:
    """Plain values composed from YAML, plus where each dotted key was written."""

    values: dict
    locs: dict[str, _Loc]
    root: _Loc


def _compose(text: str, file: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise ConfigError(f"invalid YAML: {problem}", file, line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file) from None


def _node_value(node: yaml.Node, key: str, tree: _Tree, loc: _Loc, environ, secret: bool = False) -> Any:
    """Plain Python value of ``node``; mappings record each key's location in ``tree.locs``.

    Env references under a ``storage_options`` key (or anywhere when ``secret``) become Secrets.
    """
    secret = secret or "storage_options" in key.split(".")
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            name = _scalar(key_node, loc)
            here = dataclasses.replace(loc, line=key_node.start_mark.line + 1) if loc.line else loc
            path = f"{key}.{name}" if key else str(name)
            if name in out:
                raise here.error(path, "duplicate key")
            tree.locs[path] = here
            out[name] = _node_value(value_node, path, tree, here, environ, secret)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_value(item, key, tree, loc, environ, secret) for item in node.value]
    value = _scalar(node, loc)
    return _resolve_env(value, loc, key, environ, secret) if isinstance(value, str) else value


def _scalar(node: yaml.Node, loc: _Loc) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise loc.error(None, "mapping keys must be plain scalars")
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except yaml.YAMLError as exc:
        raise loc.error(None, f"invalid value: {exc}") from None


def _read_tree(path: str, environ) -> _Tree:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("config file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", path) from None
    node = _compose(text, path)
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


# ---------------------------------------------------------------------------- conversion
def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
             dict: "mapping", type(None): "null"}
    return names.get(type(value), "string" if isinstance(value, str) else type(value).__name__)


def _show(value: Any) -> str:
    if isinstance(value, Secret):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _from_env_text(value: Any, tp) -> Any:
    """An env value standing for a number or boolean is parsed by YAML scalar rules."""
    if isinstance(value, EnvValue) and tp in (int, float, bool):
        try:
            return yaml.safe_load(str.__str__(value))
        except yaml.YAMLError:
            return value
    return value


def _convert(tp, value: Any, key: str, loc: _Loc) -> Any:
    """Check ``value`` against the annotated type ``tp``; returns the typed value."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise loc.error(key, f"must not be null (expected {_expected(tp)})")
    value = _from_env_text(value, tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _to_enum(tp, value, key, loc)
    if tp is bool:
        return _expect(isinstance(value, bool), value, value, "a boolean (true/false)", key, loc)
    if tp is int:
        return _expect(isinstance(value, int) and not isinstance(value, bool), value, value,
                       "an integer", key, loc)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return _expect(ok, value, float(value) if ok else value, "a number", key, loc)
    if tp is str:
        return _expect(isinstance(value, str), value, value, "a string", key, loc)
    if typing.get_origin(tp) is list:
        _expect(isinstance(value, list), value, value, "a list", key, loc)
        item = typing.get_args(tp)[0]
        return [_convert(item, v, f"{key}[{i}]", loc) for i, v in enumerate(value)]
    if typing.get_origin(tp) is dict:
        _expect(isinstance(value, dict), value, value, "a mapping", key, loc)
        return _plain_mapping(value, key, loc)
    raise TypeError(f"unsupported schema type {tp!r} for {key}")


def _expected(tp) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.value for m in tp)
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, "a value")


def _expect(ok: bool, raw: Any, value: Any, what: str, key: str, loc: _Loc) -> Any:
    if not ok:
        raise loc.error(key, f"expected {what}, got {_type_name(raw)} {_show(raw)}")
    return value


def _to_enum(tp, value: Any, key: str, loc: _Loc):
    choices = [m.value for m in tp]
    if isinstance(value, str) and value in choices:
        return tp(value)
    hint = difflib.get_close_matches(str(value), choices, n=1)
    extra = f"; did you mean {hint[0]!r}?" if hint else ""
    raise loc.error(key, f"must be one of {', '.join(choices)} (got {_show(value)}){extra}")


def _plain_mapping(value: dict, key: str, loc: _Loc) -> dict:
    for k in value:
        if not isinstance(k, str):
            raise loc.error(f"{key}.{k}", "mapping keys must be strings")
    return dict(value)


def _check_rule(meta: Mapping, value: Any, key: str, loc: _Loc) -> None:
    rule: Rule | None = meta.get("rule")
    if rule is None or value is None:
        return
    if not rule.check(value):
        raise loc.error(key, f"must be {rule.text} (got {_show(value)})")


def _suggest(name: str, group) -> str:
    """A "did you mean" for an unknown key: a close key in the same group, else one elsewhere."""
    known = [f.name for f in dataclasses.fields(group)]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    elsewhere = [path for path, leaf in _all_keys().items() if leaf == name]
    elsewhere = elsewhere or difflib.get_close_matches(name, list(_all_keys()), n=1, cutoff=0.75)
    if elsewhere:
        return f"; did you mean {elsewhere[0]!r}?"
    return f"; known keys: {', '.join(known)}"


def _all_keys() -> dict[str, str]:
    """Every dotted schema key -> its last component."""
    out = {}
    hints = typing.get_type_hints(JobConfig)
    for f in dataclasses.fields(JobConfig):
        out[f.name] = f.name
        if is_group(hints[f.name]):
            out.update({f"{f.name}.{sub.name}": sub.name for sub in dataclasses.fields(hints[f.name])})
    return out


def _build_group(cls, raw: Any, prefix: str, tree: _Tree, group_loc: _Loc):
    """Instantiate schema class ``cls`` from the raw mapping at ``prefix``."""
    if not isinstance(raw, dict):
        raise group_loc.error(prefix.rstrip(".") or None,
                              f"expected a mapping of keys, got {_type_name(raw)} {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            loc = tree.locs.get(f"{prefix}{key}", group_loc)
            raise loc.error(f"{prefix}{key}", "unknown key" + _suggest(str(key), cls))
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in raw:
            if f.metadata.get("required"):
                raise group_loc.error(key, "missing required key")
            continue
        kwargs[f.name] = _build_value(hints[f.name], f, raw[f.name], key, tree)
    return cls(**kwargs)


def _build_value(tp, f: dataclasses.Field, raw: Any, key: str, tree: _Tree):
    loc = tree.locs.get(key, tree.root)
    if tp is WorkersConfig:
        return _build_workers(raw, key, tree, loc)
    if is_group(tp):
        return _build_group(tp, raw, key + ".", tree, loc)
    value = _convert(tp, raw, key, loc)
    _check_rule(f.metadata, value, key, loc)
    return value


def _build_workers(raw: Any, key: str, tree: _Tree, loc: _Loc) -> WorkersConfig:
    """``workers: N`` or ``workers: {min: a, max: b}``."""
    if isinstance(raw, dict):
        if "min" in raw and "max" not in raw:
            raw = {**raw, "max": raw["min"]}
        elif "max" in raw and "min" not in raw:
            raw = {**raw, "min": raw["max"]}
        return _build_group(WorkersConfig, raw, key + ".", tree, loc)
    raw = _from_env_text(raw, int)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise loc.error(key, f"expected an integer or {{min: N, max: M}}, got {_type_name(raw)} {_show(raw)}")
    if raw < 1:
        raise loc.error(key, f"must be >= 1 (got {raw})")
    return WorkersConfig(min=raw, max=raw)


# ---------------------------------------------------------------------------- cross-field checks
def _check_combinations(cfg: JobConfig, tree: _Tree) -> None:
    """Rules that involve more than one key; each error points at the key to change."""

    def at(key: str) -> _Loc:
        while key and key not in tree.locs:
            key = key.rpartition(".")[0]
        return tree.locs.get(key, tree.root)

    ck = cfg.checkpoint
    if cfg.workers.min > cfg.workers.max:
        raise at("workers.min").error("workers.min", f"must be <= workers.max ({cfg.workers.min} > {cfg.workers.max})")
    if not ck.save_every_steps and ck.save_every_secs is None:
        raise at("checkpoint.save_every_steps").error(
            "checkpoint.save_every_steps", "checkpointing is off: set save_every_steps > 0 or save_every_secs")
    if ck.keep_best is not None and not ck.best_metric:
        raise at("checkpoint.keep_best").error("checkpoint.keep_best", "needs checkpoint.best_metric (e.g. loss)")
    if cfg.data.dataset is Dataset.MNIST and not cfg.data.path:
        raise at("data.dataset").error(
            "data.path", "dataset mnist needs data.path: the directory or URL of the IDX files")
    if not cfg.name.strip() or "/" in cfg.name:
        raise at("name").error("name", f"must be a non-empty name without '/' (got {cfg.name!r})")
    if not ck.dir.strip():
        raise at("checkpoint.dir").error("checkpoint.dir", "must not be empty")
    if cfg.resume.strip() == "":
        raise at("resume").error("resume", "must be auto, never, or a checkpoint path")


def _normalise(cfg: JobConfig) -> JobConfig:
    """Fill the defaults that depend on other keys (run_dir, gpus_per_worker)."""
    run_dir = cfg.run_dir or os.path.join("runs", cfg.name)
    gpus = cfg.resources.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cfg.device is Device.GPU else 0.0
    resources = dataclasses.replace(cfg.resources, gpus_per_worker=gpus)
    return dataclasses.replace(cfg, run_dir=run_dir, resources=resources)


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
    cfg = _build_group(JobConfig, tree.values, "", tree, tree.root)
    _check_combinations(cfg, tree)
    return _normalise(cfg)


def config_to_dict(cfg: Any, reveal: bool = False) -> Any:
    """Plain YAML-able data; env-resolved values become their ``${VAR}`` reference unless ``reveal``."""
    if dataclasses.is_dataclass(cfg):
        names = [f.name for f in dataclasses.fields(cfg)]
        return {n: config_to_dict(getattr(cfg, n), reveal) for n in names}
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

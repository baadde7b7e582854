"""Plug-ins named in the job config: ``module:callable`` factories for models, data, optimizers.

    model:     {factory: my_models:build, args: {hidden: 32}}
        -> build(*, input_shape, num_classes, backend, seed, **args)    a model (``protocol``)
    data:      {factory: my_data:load, args: {...}}
        -> load(*, seed, **args)                                       arrays (``data.from_arrays``)
    optimizer: {factory: my_opt:build, args: {...}}
        -> build(*, learning_rate, **args)   an object with create_slots(var) and apply(var, grad, slots, step)

The module is imported from the job directory (the directory the job runs in, which
the runtime ships to every worker, see ``cluster.shipping``) or from ``sys.path``.

Where code is imported: only where the user named it. A job imports the factories its
config names; ``load_model`` imports a checkpoint's plug-in factory only when the caller
passes it (``factory=``). Nothing is ever imported, unpickled or evaluated because a
checkpoint says so: the structure record only lets the caller check that the factory
and arguments are the ones the weights were trained with.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from orchestrator import rules
from orchestrator.engine import protocol
from orchestrator.engine.protocol import PluginError

FACTORY_PATTERN = re.compile(rules.FACTORY)
OPTIMIZER_METHODS = ("create_slots", "apply")


def check_factory_name(name: str | None) -> str | None:
    """None if ``name`` is None or looks like ``package.module:callable``, else what is wrong."""
    if name is None:
        return None
    if not isinstance(name, str) or not FACTORY_PATTERN.match(name):
        return f"expected {rules.FACTORY_TEXT}, got {name!r}"
    return None


def add_import_dirs(directories: Sequence[str]) -> None:
    """Put ``directories`` (absolute) at the front of ``sys.path``, in this order, once each.

    At the front, not just somewhere: a worker runs in the shipped copy of the job directory,
    and that copy must win over a same-named directory the driver's ``sys.path`` passed on.
    """
    wanted = [os.path.abspath(d) for d in directories]
    sys.path[:] = wanted + [p for p in sys.path if p not in wanted and os.path.abspath(p or ".") not in wanted]


def import_callable(name: str, key: str) -> Callable:
    """The callable ``name`` = ``module:attr.path``; ``PluginError`` (at ``key``) saying why not."""
    problem = check_factory_name(name)
    if problem:
        raise PluginError(problem, key)
    module_name, _, attr_path = name.partition(":")
    add_import_dirs([os.getcwd()])  # "found from the directory the job runs in"
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raised while importing
        raise PluginError(f"cannot import {module_name!r} for {name}: {type(exc).__name__}: {exc} "
                          f"(searched the job directory {os.getcwd()} and sys.path)", key) from None
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise PluginError(f"{name}: module {module_name!r} ({getattr(target, '__file__', '?')}) "
                              f"has no attribute {part!r}", key)
        target = getattr(target, part)
    if not callable(target):
        raise PluginError(f"{name} is not callable: it is {type(target).__name__} {target!r:.40}", key)
    return target


PLUGIN_KIND = "plugin"


@dataclass(frozen=True)
class PluginSpec:
    """A plug-in model as the structure record stores it: factory, args, and what it was built for.

    Record: ``{"kind": "plugin", "factory": "my_models:build", "args": {...}, "input_shape": [12],
    "num_classes": 3}`` (``kind`` makes readers that know only built-in kinds refuse it by name).
    """

    factory: str
    args: dict = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    num_classes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (for the checkpoint's structure record)."""
        return {"kind": PLUGIN_KIND, "factory": self.factory, "args": _json_safe(self.args, "model.args"),
                "input_shape": list(self.input_shape), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "PluginSpec":
        known = {"kind", "factory", "args", "input_shape", "num_classes"}
        unknown = sorted(set(record) - known)
        if unknown or "factory" not in record:
            raise PluginError(f"plug-in model spec must have keys {sorted(known)}, got {sorted(record)}")
        return cls(str(record["factory"]), dict(record.get("args") or {}),
                   tuple(int(d) for d in record.get("input_shape") or ()), record.get("num_classes"))

    def build(self, backend: Any, seed: int) -> Any:
        """The model (``models.build_model`` calls this for every spec that is not an MLP)."""
        return build_plugin_model(self, backend, seed)


def is_plugin_record(spec: Mapping[str, Any]) -> bool:
    return spec.get("kind") == PLUGIN_KIND


def build_plugin_model(spec: PluginSpec, backend: Any, seed: int,
                       factory: Callable | None = None) -> Any:
    """Call the factory (imported from ``spec.factory`` unless given) and check the protocol."""
    build = factory if factory is not None else import_callable(spec.factory, "model.factory")
    where = spec.factory
    try:
        model = build(input_shape=tuple(spec.input_shape), num_classes=spec.num_classes,
                      backend=backend, seed=int(seed), **spec.args)
    except Exception as exc:
        raise PluginError(f"{where} raised {type(exc).__name__}: {exc}", "model.factory") from exc
    protocol.check_model(model, where)
    return model


def build_plugin_optimizer(name: str, args: Mapping[str, Any], learning_rate: float) -> Any:
    """The object ``optimizer.factory`` returns; checked for ``create_slots`` and ``apply``."""
    build = import_callable(name, "optimizer.factory")
    try:
        optimizer = build(learning_rate=float(learning_rate), **dict(args))
    except Exception as exc:
        raise PluginError(f"{name} raised {type(exc).__name__}: {exc}", "optimizer.factory") from exc
    missing = [m for m in OPTIMIZER_METHODS if not callable(getattr(optimizer, m, None))]
    if missing:
        raise PluginError(f"{name} returned a {type(optimizer).__name__} without method(s) {missing}",
                          "optimizer.factory")
    return optimizer


def call_data_factory(name: str, args: Mapping[str, Any], seed: int) -> Any:
    """What ``data.factory`` returns (validated by ``data.from_arrays``)."""
    load = import_callable(name, "data.factory")
    try:
        return load(seed=int(seed), **dict(args))
    except Exception as exc:
        raise PluginError(f"{name} raised {type(exc).__name__}: {exc}", "data.factory") from exc


def _json_safe(value: Any, key: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{key} must hold plain values (numbers, strings, lists, mappings): {exc}", key) from None

"""Plug-in models and data files written by the tests themselves (never shipped with the package).

``write_plugin(directory)`` writes a module holding a linear softmax classifier with input
dropout drawn through ``orchestrator.plugin.uniform``, plus deliberately broken variants;
``write_data(...)`` writes a learnable classification set as npz or parquet, locally or
to any fsspec URL; ``write_job(...)`` writes the job YAML that ties them together.
"""

from __future__ import annotations

import io
import textwrap
import uuid
from pathlib import Path

import numpy as np

PLUGIN_SOURCE = '''
"""A plug-in written by a test: linear softmax classification with input dropout."""
import numpy as np
from orchestrator.plugin import Variable, uniform

IMPORTED_FROM = __file__


def build(*, input_shape, num_classes, backend, seed, keep_prob=0.8, scale=0.1):
    generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 7])))
    dim = int(np.prod(input_shape))
    weights = (generator.standard_normal((dim, num_classes)) * scale).astype(np.float32)
    return Linear([Variable("linear/weights", backend.asarray(weights)),
                   Variable("linear/bias", backend.asarray(np.zeros(num_classes, np.float32)))],
                  backend, keep_prob)


class Linear:
    def __init__(self, variables, backend, keep_prob):
        self.variables, self.backend, self.keep_prob = variables, backend, keep_prob

    def _probabilities(self, params, x):
        w, b = params["linear/weights"], params["linear/bias"]
        logits = x @ w + b
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def loss_and_grads(self, params, x, y, *, step, example_offset, global_batch_size, seed, train=True):
        dtype = params["linear/weights"].dtype
        x = np.asarray(x, dtype).reshape(len(x), -1)
        if train and self.keep_prob < 1:
            keep = uniform(seed, step, example_offset, x.shape) < self.keep_prob
            x = x * keep / dtype.type(self.keep_prob)
        p = self._probabilities(params, x)
        rows = np.arange(len(y))
        loss = float(-np.log(p[rows, y]).sum())
        correct = int((p.argmax(axis=1) == y).sum())
        d = p.copy()
        d[rows, y] -= 1
        d /= dtype.type(global_batch_size)
        return loss, correct, {"linear/weights": x.T @ d, "linear/bias": d.sum(axis=0)}

    def evaluate(self, params, x, y):
        dtype = params["linear/weights"].dtype
        p = self._probabilities(params, np.asarray(x, dtype).reshape(len(x), -1))
        rows = np.arange(len(y))
        return float(-np.log(p[rows, y]).mean()), float((p.argmax(axis=1) == y).mean())
'''

# Broken variants: each replaces one piece of the good plug-in.
BROKEN = {
    "wrong_gradient": '''
class WrongGradient(Linear):
    def loss_and_grads(self, params, x, y, **kw):
        loss, correct, grads = super().loss_and_grads(params, x, y, **kw)
        grads["linear/bias"] = grads["linear/bias"] * 2   # off by a factor of two
        return loss, correct, grads

def build_wrong_gradient(**kw):
    m = build(**kw)
    return WrongGradient(m.variables, m.backend, m.keep_prob)
''',
    "wrong_name": '''
class WrongName(Linear):
    def loss_and_grads(self, params, x, y, **kw):
        loss, correct, grads = super().loss_and_grads(params, x, y, **kw)
        grads["linear/biases"] = grads.pop("linear/bias")
        return loss, correct, grads

def build_wrong_name(**kw):
    m = build(**kw)
    return WrongName(m.variables, m.backend, m.keep_prob)
''',
    "wrong_shape": '''
class WrongShape(Linear):
    def loss_and_grads(self, params, x, y, **kw):
        loss, correct, grads = super().loss_and_grads(params, x, y, **kw)
        grads["linear/weights"] = grads["linear/weights"].T
        return loss, correct, grads

def build_wrong_shape(**kw):
    m = build(**kw)
    return WrongShape(m.variables, m.backend, m.keep_prob)
''',
    "wrong_dtype": '''
class WrongDtype(Linear):
    def loss_and_grads(self, params, x, y, **kw):
        loss, correct, grads = super().loss_and_grads(params, x, y, **kw)
        grads["linear/bias"] = grads["linear/bias"].astype("float64")
        return loss, correct, grads

def build_wrong_dtype(**kw):
    m = build(**kw)
    return WrongDtype(m.variables, m.backend, m.keep_prob)
''',
    "batch_dependent": '''
class BatchDependent(Linear):
    """Normalises by the slice it sees instead of global_batch_size: depends on how the batch is split."""
    def loss_and_grads(self, params, x, y, *, global_batch_size, **kw):
        return super().loss_and_grads(params, x, y, global_batch_size=len(y), **kw)

def build_batch_dependent(**kw):
    m = build(**kw)
    return BatchDependent(m.variables, m.backend, m.keep_prob)
''',
    "stateful_rng": '''
class StatefulRandom(Linear):
    """Draws dropout from a generator whose state advances: calls with the same (seed, step, offset) differ."""
    _generator = np.random.default_rng(0)
    def loss_and_grads(self, params, x, y, *, step, example_offset, global_batch_size, seed, train=True):
        dtype = params["linear/weights"].dtype
        x = np.asarray(x, dtype) * (self._generator.random(np.shape(x)) < 0.8) / dtype.type(0.8)
        return super().loss_and_grads(params, x, y, step=step, example_offset=example_offset,
                                      global_batch_size=global_batch_size, seed=seed, train=False)

def build_stateful_rng(**kw):
    m = build(**kw)
    return StatefulRandom(m.variables, m.backend, m.keep_prob)
''',
    "late_wrong_gradient": '''
class LateWrong(Linear):
    """Right at first, a grad of the wrong shape from step 6 on (only seen at run time)."""
    def loss_and_grads(self, params, x, y, *, step, **kw):
        loss, correct, grads = super().loss_and_grads(params, x, y, step=step, **kw)
        if step >= 6:
            grads["linear/bias"] = grads["linear/bias"][:-1]
        return loss, correct, grads

def build_late_wrong_gradient(**kw):
    m = build(**kw)
    return LateWrong(m.variables, m.backend, m.keep_prob)
''',
    "nan_loss": '''
class NanLater(Linear):
    """Finite at first; from step 7 on the loss and gradients are NaN (an exploding model)."""
    def loss_and_grads(self, params, x, y, *, step, **kw):
        loss, correct, grads = super().loss_and_grads(params, x, y, step=step, **kw)
        if step >= 7:
            return float("nan"), correct, {k: v * np.float32("nan") for k, v in grads.items()}
        return loss, correct, grads

def build_nan_loss(**kw):
    m = build(**kw)
    return NanLater(m.variables, m.backend, m.keep_prob)
''',
    "no_evaluate": '''
class NoEvaluate:
    def __init__(self, variables):
        self.variables = variables
    def loss_and_grads(self, params, x, y, **kw):
        return 0.0, 0, {}

def build_no_evaluate(**kw):
    return NoEvaluate(build(**kw).variables)
''',
    "reporting": '''
def build_reporting(*, report_to, **kw):
    """The good model, after writing down where this process imported the module from."""
    import json
    import os
    node = "driver"
    try:
        import ray
        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    with open(os.path.join(report_to, f"{os.getpid()}.json"), "w") as f:
        json.dump({"node": node, "file": IMPORTED_FROM, "cwd": os.getcwd()}, f)
    return build(**kw)
''',
    "raises": '''
def build_raises(*, input_shape, num_classes, backend, seed, **kw):
    raise ValueError(f"hidden must be positive, got {kw.get('hidden')}")
''',
    "not_callable": '''
build_not_callable = 42
''',
}

NUM_FEATURES, NUM_CLASSES = 12, 3


def module_name(tag: str = "plug") -> str:
    """A module name no other test uses (the driver process caches imported modules)."""
    return f"{tag}_{uuid.uuid4().hex[:10]}"


def write_plugin(directory: Path, name: str | None = None) -> str:
    """Writes the plug-in module (good and broken factories) into ``directory``; returns its name."""
    name = name or module_name()
    directory.mkdir(parents=True, exist_ok=True)
    source = PLUGIN_SOURCE + "".join(BROKEN.values())
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def make_arrays(num_examples: int = 600, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Features in [0, 1) labelled by a random linear teacher (learnable by the plug-in)."""
    generator = np.random.default_rng(seed)
    teacher = generator.standard_normal((NUM_FEATURES, NUM_CLASSES))
    x = generator.random((num_examples, NUM_FEATURES)).astype(np.float32)
    return x, np.argmax((x - 0.5) @ teacher, axis=1).astype(np.int64)


def encode(fmt: str, x: np.ndarray, y: np.ndarray) -> bytes:
    """The bytes of an npz or parquet file holding features ``x``/``f0..`` and labels ``y``."""
    buffer = io.BytesIO()
    if fmt == "npz":
        np.savez(buffer, x=x, y=y)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {f"f{i}": x[:, i] for i in range(x.shape[1])}
        pq.write_table(pa.table({**columns, "y": y}), buffer)
    return buffer.getvalue()


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    import fsspec

    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(data)


def write_data(root: str, fmt: str, storage_options: dict | None = None,
               num_examples: int = 600) -> tuple[str, str]:
    """Train and eval files under ``root`` (a local directory or a URL); returns their paths."""
    x, y = make_arrays(num_examples + 200)
    paths = []
    for split, rows in (("train", slice(0, num_examples)), ("eval", slice(num_examples, None))):
        path = f"{root.rstrip('/')}/{split}.{fmt}"
        if "://" not in path:
            Path(root).mkdir(parents=True, exist_ok=True)
        write_bytes(path, encode(fmt, x[rows], y[rows]), storage_options)
        paths.append(path)
    return paths[0], paths[1]


def data_yaml(fmt: str, train: str, evaluation: str | None, storage_options: dict | None = None) -> str:
    features = "x" if fmt == "npz" else "[" + ", ".join(f"f{i}" for i in range(NUM_FEATURES)) + "]"
    lines = [f"  format: {fmt}", f"  path: {train}", f"  features: {features}", "  labels: y"]
    if evaluation:
        lines.append(f"  eval_path: {evaluation}")
    if storage_options:
        import json

        lines.append(f"  storage_options: {json.dumps(storage_options)}")
    return "\n".join(lines)


def write_job(directory: Path, module: str, data: str, *, factory: str = "build", workers: int = 2,
              steps: int = 20, save_every: int = 5, checkpoint_dir: str = "ckpt", extra: str = "",
              checkpoint_options: dict | None = None, args: str = "{keep_prob: 0.8}") -> Path:
    """A job YAML in ``directory`` training ``module:factory`` on ``data`` (a ``data_yaml`` block)."""
    import json

    options = f"\n  storage_options: {json.dumps(checkpoint_options)}" if checkpoint_options else ""
    text = f"""\
name: plugin-test
seed: 5
model:
  factory: {module}:{factory}
  args: {args}
data:
{data}
  global_batch_size: 30
optimizer: {{name: adam, learning_rate: 0.05}}
train: {{steps: {steps}, log_every_steps: 1, eval_every_steps: 0}}
workers: {workers}
resources: {{cpus_per_worker: 0.25}}
checkpoint:
  dir: {checkpoint_dir}
  save_every_steps: {save_every}
  max_to_keep: 10
  fsync: false{options}
fault_tolerance: {{step_timeout_s: 60, backoff_s: 0.1}}
logging: {{progress: plain, tensorboard: false}}
{extra}
"""
    path = directory / "job.yaml"
    path.write_text(text)
    return path

"""Datasets and the deterministic sampler.

    load_dataset("digits" | "mnist" | "synthetic" | "chars", path=None, storage_options=None, **opts) -> Dataset

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels
  scaled to [0, 1], input_dim 64; a fixed split (``test_fraction`` 0.2 by default,
  permutation seeded by ``split_seed`` 0).
- ``mnist``: the four IDX files (``train-images-idx3-ubyte`` ... ``t10k-labels-idx1-ubyte``,
  raw or ``.gz``) in the directory or URL ``path``, read through ``Storage`` (fsspec).
- ``synthetic``: ``num_examples``/``num_test`` examples of ``input_dim`` uniform
  features labelled by a random linear teacher: learnable, any size, a function of ``seed``.
- ``chars``: next-character prediction on a text: by default the Python documentation
  topics that ship with every Python (``pydoc_data.topics``, about 465k characters), else
  the UTF-8 text file ``path``. The vocabulary is the sorted set of the text's characters;
  the last ``eval_fraction`` (0.1) of the text is held out. An example is ``context``
  token ids and the same window shifted by one as labels ([context] each); training
  windows start every ``context // 2`` characters, held-out windows every ``context``.

``Sampler(num_examples, global_batch_size, seed)``: the order of examples in epoch
``e`` is the permutation drawn by ``Generator(Philox(SeedSequence([seed, e])))``.
Batches have constant size and run on into the next epoch. The position
``{"epoch", "index"}`` (``state()``/``set_state()``) is what a checkpoint stores to
resume exactly. ``split(indices, rank, world_size)`` cuts a global batch
contiguously by rank (the first ``len % world_size`` ranks get one more) and returns
the rank's indices and their offset in the global batch (the dropout example offset).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from orchestrator import rules
from orchestrator.checkpoint.storage import Storage
from orchestrator.errors import BadInputError, InvalidArgumentError, KeyedError

DATASETS = ("digits", "mnist", "synthetic", "chars")
MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
DATASET_OPTIONS = {
    "digits": ("test_fraction", "split_seed"),
    "mnist": (),
    "synthetic": ("num_examples", "input_dim", "num_classes", "num_test", "seed"),
    "chars": ("context", "eval_fraction"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(KeyedError, BadInputError, ValueError):
    """A dataset cannot be loaded; the message names the file or option at fault, ``key``
    the config key to change (``data.labels``), when there is one."""


@dataclass(frozen=True)
class Dataset:
    """Features [N, ...] (float32 [N, D] in [0, 1] for the built-in sets) and labels [N]: int64
    class ids, or floating point targets (regression); for ``chars``, token ids [N, context] and
    next-token labels [N, context], with the characters in ``vocabulary``. ``classes``: the
    number of classes when known beyond the labels seen; the test split may be empty (no
    evaluation)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    vocabulary: tuple[str, ...] | None = None
    classes: int | None = None

    @property
    def input_dim(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.train_x.shape[1:])

    @property
    def is_regression(self) -> bool:
        return bool(np.issubdtype(self.train_y.dtype, np.floating))

    @property
    def num_classes(self) -> int | None:
        """None for regression targets; else the vocabulary size, ``classes``, or the largest label + 1."""
        if self.is_regression:
            return None
        if self.vocabulary is not None:
            return len(self.vocabulary)
        if self.classes is not None:
            return int(self.classes)
        return int(max(self.train_y.max(), self.test_y.max(initial=0))) + 1


def load_dataset(name: str, path: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, **opts: Any) -> Dataset:
    """Load dataset ``name`` (see the module docstring for each one's options)."""
    if name not in DATASETS:
        raise DatasetError(f"dataset must be one of {DATASETS}, got {name!r}")
    unknown = sorted(set(opts) - set(DATASET_OPTIONS[name]))
    if unknown:
        raise DatasetError(f"dataset {name!r} does not take option(s) {unknown}; "
                           f"it takes {list(DATASET_OPTIONS[name])}")
    if name == "digits":
        return load_digits(**opts)
    if name == "synthetic":
        return make_synthetic(**opts)
    if name == "chars":
        return load_chars(path, storage_options, **opts)
    if path is None:
        raise DatasetError("dataset 'mnist' needs a path (directory or URL holding the IDX files)")
    return load_mnist(path, storage_options)


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's digits with a fixed, seeded, stratified train/test split."""
    table = _digits_table()
    x = (table[:, :-1] / 16.0).astype(np.float32)                   # [1797, 64]
    y = table[:, -1].astype(np.int64)
    test = stratified_test_indices(y, test_fraction, split_seed)
    train = np.setdiff1d(np.arange(len(y)), test)
    return Dataset(x[train], y[train], x[test], y[test])


def _digits_table() -> np.ndarray:
    """The digits as scikit-learn ships them: 1797 rows of 64 pixel values (0-16) and the label.

    Read straight from the package's ``datasets/data/digits.csv.gz``: importing
    ``sklearn.datasets`` pulls in scipy and takes about a second, paid by every digits job's start
    (and by every test that runs one) for a 60 KB file. The same parse scikit-learn does
    (``np.loadtxt`` of the decompressed CSV); its loader is the fallback should the file move.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return read_digits_csv(path)
    from sklearn.datasets import load_digits as sklearn_digits

    data, target = sklearn_digits(return_X_y=True)
    return np.column_stack([data, target])


def read_digits_csv(path: str) -> np.ndarray:
    """The rows of a gzip'd digits CSV (64 pixel values and the label per row); a damaged
    file is a ``DatasetError`` naming it, not a numpy traceback."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            table = np.loadtxt(lines, delimiter=",", ndmin=2)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset 'digits': {path} is unreadable ({exc}); reinstall scikit-learn, "
                           f"whose copy it is") from None
    if table.shape[1] != 65:
        raise DatasetError(f"dataset 'digits': {path} has {table.shape[1]} columns, expected 64 pixel values "
                           f"and a label; reinstall scikit-learn, whose copy it is")
    return table


def stratified_test_indices(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a test set holding ``test_fraction`` of every class."""
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed])))
    picked = []
    for label in np.unique(labels):
        members = generator.permutation(np.flatnonzero(labels == label))
        picked.append(members[:int(round(len(members) * test_fraction))])
    return np.sort(np.concatenate(picked))


def make_synthetic(num_examples: int = 10000, input_dim: int = 784, num_classes: int = 10,
                   num_test: int | None = None, seed: int = 0) -> Dataset:
    """Uniform features labelled by argmax of a random linear teacher."""
    rules.EXAMPLES.check("synthetic num_examples", num_examples, DatasetError)
    rules.WIDTH.check("synthetic input_dim", input_dim, DatasetError)
    rules.CLASSES.check("synthetic num_classes", num_classes, DatasetError)
    too_big = rules.synthetic_problem(num_examples, input_dim)
    if too_big:
        raise DatasetError(f"synthetic: {too_big}")
    num_test = max(1, num_examples // 5) if num_test is None else num_test
    generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0x5EED])))
    teacher = generator.standard_normal((input_dim, num_classes)).astype(np.float32)
    x = generator.random((num_examples + num_test, input_dim), dtype=np.float32)
    y = np.argmax((x - 0.5) @ teacher, axis=1).astype(np.int64)
    return Dataset(x[:num_examples], y[:num_examples], x[num_examples:], y[num_examples:])


# --------------------------------------------------------------------------- characters
def python_docs_text() -> str:
    """The pydoc topics shipped with Python, in a fixed order (sorted by topic name)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))


def load_chars(path: str | None = None, storage_options: Mapping[str, Any] | None = None,
               context: int = 64, eval_fraction: float = 0.1) -> Dataset:
    """Next-character windows of a text (see the module docstring)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise DatasetError(f"chars: context must be a positive integer, got {context!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise DatasetError(f"chars: eval_fraction must be in (0, 1), got {eval_fraction}")
    text = python_docs_text() if path is None else _read_text(path, storage_options)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    points, ids = np.unique(codes, return_inverse=True)
    split = int(len(ids) * (1.0 - eval_fraction))
    train, test = ids[:split], ids[split:]
    if min(len(train), len(test)) < context + 1:
        raise DatasetError(f"chars: {path or 'pydoc_data'} holds {len(ids)} characters, too few for "
                           f"context {context} with eval_fraction {eval_fraction}")
    train_x, train_y = _windows(train, context, max(1, context // 2))
    test_x, test_y = _windows(test, context, context)
    vocabulary = tuple(chr(int(p)) for p in points)
    return Dataset(train_x, train_y, test_x, test_y, vocabulary)


def _read_text(path: str, storage_options: Mapping[str, Any] | None) -> str:
    storage, location = Storage.for_path(path, storage_options)
    try:
        return storage.read_bytes(location).decode("utf-8")
    except FileNotFoundError:
        raise DatasetError(f"chars: text file {path} not found") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"chars: {path} is not UTF-8 text: {exc}") from None
    except OSError as exc:  # a directory, no permission: named as the data's problem (exit 2 at data.path)
        raise DatasetError(f"chars: cannot read text file {path}: {type(exc).__name__}: {exc}") from None


def _windows(ids: np.ndarray, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, next-token labels), each [N, context], for windows starting every ``stride``."""
    starts = np.arange(0, len(ids) - context, stride)
    offsets = starts[:, None] + np.arange(context)[None, :]
    return ids[offsets].astype(np.int32), ids[offsets + 1].astype(np.int64)


def unigram_cross_entropy(dataset: Dataset) -> float:
    """Mean cross-entropy (nats) of the held-out labels under the training labels' character
    frequencies (add-one smoothed): the loss of a model that ignores context, the baseline
    a character model must beat."""
    classes = dataset.num_classes
    counts = np.bincount(dataset.train_y.ravel(), minlength=classes).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[dataset.test_y.ravel()].mean())


# --------------------------------------------------------------------------- MNIST IDX
def load_mnist(path: str, storage_options: Mapping[str, Any] | None = None) -> Dataset:
    """The four MNIST IDX files under ``path`` (local directory or fsspec URL)."""
    storage, root = Storage.for_path(path, storage_options)
    arrays = {key: read_idx(storage, _find_idx(storage, root, stem)) for key, stem in MNIST_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise DatasetError(f"mnist at {path}: {split} has {len(arrays[f'{split}_x'])} images "
                               f"but {len(arrays[f'{split}_y'])} labels")
    return Dataset(_images(arrays["train_x"]), arrays["train_y"].astype(np.int64),
                   _images(arrays["test_x"]), arrays["test_y"].astype(np.int64))


def mnist_train_examples(path: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """How many training examples ``load_mnist(path)`` holds, read from its labels file alone
    (tens of KiB), after checking that all four files are there."""
    storage, root = Storage.for_path(path, storage_options)
    found = {key: _find_idx(storage, root, stem) for key, stem in MNIST_FILES.items()}
    return len(read_idx(storage, found["train_y"]))


def _find_idx(storage: Storage, root: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        candidate = Storage.join(root, name)
        if storage.exists(candidate):
            return candidate
    raise DatasetError(f"mnist: neither {stem} nor {stem}.gz found in {root}")


def _images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 784] in [0, 1]."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    flat /= 255.0
    return flat


def read_idx(storage: Storage, path: str) -> np.ndarray:
    """Parse one IDX file (gzip-compressed when it starts with the gzip magic)."""
    data = storage.read_bytes(path)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path}: corrupt gzip stream: {exc}") from exc
    return parse_idx(data, path)


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """IDX: 2 zero bytes, a dtype code, the number of dims, big-endian uint32 dims, then the data."""
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise DatasetError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: IDX shape {shape} needs {expected} data bytes, file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------- arrays from users
def from_arrays(train: tuple[Any, Any], test: tuple[Any, Any] | None, num_classes: int | None,
                source: str, keys: tuple[str, str] = ("data.features", "data.labels")) -> Dataset:
    """A checked ``Dataset`` from user arrays (files or a data factory).

    Features become [N, ...] floating point (integers and booleans as float32), labels [N]
    int64 (classification) or floating (regression). Raises ``DatasetError`` naming
    ``source`` and the config key for: no examples, features and labels of different
    lengths, NaN/inf features or targets, class labels outside ``[0, num_classes)``.
    """
    train_x, train_y = _checked_split(*train, f"{source} (train)", keys)
    if test is None:
        test_x, test_y = train_x[:0], train_y[:0]
    else:
        test_x, test_y = _checked_split(*test, f"{source} (eval)", keys, allow_empty=True)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DatasetError(f"{source}: eval features have shape [N, {', '.join(map(str, test_x.shape[1:]))}] "
                               f"but train features [N, {', '.join(map(str, train_x.shape[1:]))}]", keys[0])
        if np.issubdtype(test_y.dtype, np.floating) != np.issubdtype(train_y.dtype, np.floating):
            raise DatasetError(f"{source}: eval labels are {test_y.dtype} but train labels {train_y.dtype}", keys[1])
    dataset = Dataset(train_x, train_y, test_x, test_y, classes=num_classes)
    if not dataset.is_regression:
        _check_class_labels(dataset, num_classes, source, keys[1])
    return dataset


def checked_examples(x: Any, y: Any, source: str,
                     keys: tuple[str, str] = ("data.features", "data.labels")) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one part of a dataset (a shard file), checked as ``from_arrays``
    checks a split: lengths, dtypes, finite values. The class checks need every part: not here."""
    return _checked_split(x, y, source, keys)


def check_same_length(x: Any, y: Any, source: str,
                      keys: tuple[str, str] = ("data.features", "data.labels")) -> None:
    """``DatasetError`` at the labels' key unless features and labels have as many rows."""
    if len(x) != len(y):
        raise DatasetError(f"{source}: features ({keys[0]}) have {len(x)} rows but labels ({keys[1]}) "
                           f"{len(y)}; they must have the same length", keys[1])


def _checked_split(x: Any, y: Any, source: str, keys: tuple[str, str],
                   allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, y = _feature_array(x, source, keys[0]), _label_array(y, source, keys[1])
    check_same_length(x, y, source, keys)
    if not len(x) and not allow_empty:
        raise DatasetError(f"{source}: no examples", keys[0])
    _check_finite(x, source, keys[0], "features")
    if np.issubdtype(y.dtype, np.floating):
        _check_finite(y, source, keys[1], "labels")
    return x, y


def _feature_array(x: Any, source: str, key: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind in "biu":
        x = x.astype(np.float32)
    if x.dtype.kind != "f":
        raise DatasetError(f"{source}: features must be numeric, got dtype {x.dtype}", key)
    return x.reshape(len(x), 1) if x.ndim == 1 else x


def _label_array(y: Any, source: str, key: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(f"{source}: labels must be one value per example, got shape {list(y.shape)}", key)
    if y.dtype.kind in "biu":
        return y.astype(np.int64)
    if y.dtype.kind != "f":
        raise DatasetError(f"{source}: labels must be integers (classes) or floats (regression), "
                           f"got dtype {y.dtype}", key)
    return y


def _check_finite(values: np.ndarray, source: str, key: str, what: str) -> None:
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{source}: {what} hold NaN or inf in {int(bad.sum())} row(s), the first is row {row}", key)


def _check_class_labels(dataset: Dataset, num_classes: int | None, source: str, key: str) -> None:
    for split, labels in (("train", dataset.train_y), ("eval", dataset.test_y)):
        if not len(labels):
            continue
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            value = low if low < 0 else high
            row = int(np.flatnonzero(labels == value)[0])
            bound = f"[0, {num_classes})" if num_classes is not None else "[0, num_classes)"
            raise DatasetError(f"{source} ({split}): label {value} at row {row} is outside {bound}", key)
    if dataset.num_classes < 2:
        raise DatasetError(f"{source}: every label is 0; classification needs at least 2 classes "
                           f"(set data.num_classes, or use float labels for regression)", key)


# --------------------------------------------------------------------------- sampler
class Sampler:
    """Deterministic global batches; position (epoch, index) is checkpointable state."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        rules.Bound(ge=1).check("num_examples", num_examples)
        rules.BATCH.check("global_batch_size", global_batch_size)
        too_large = rules.batch_problem(global_batch_size, num_examples)
        if too_large:
            raise InvalidArgumentError(f"global_batch_size: {too_large}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of example indices for ``epoch``."""
        if self._order_epoch != epoch:
            generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, epoch])))
            self._order = generator.permutation(self.num_examples)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> np.ndarray:
        """The next ``global_batch_size`` example indices (int64), advancing the position."""
        parts, needed = [], self.global_batch_size
        while needed:
            take = min(needed, self.num_examples - self.index)
            parts.append(self.order(self.epoch)[self.index:self.index + take])
            self.index += take
            needed -= take
            if self.index == self.num_examples:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(parts).astype(np.int64)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: Mapping[str, int]) -> None:
        if "epoch" not in state:
            raise InvalidArgumentError(f"data position {dict(state)} was written by a job reading a directory of "
                                       f"shards; this job reads one dataset: resume it with that data")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.num_examples:
            raise InvalidArgumentError(f"sampler state {dict(state)} out of range for {self.num_examples} examples")
        self.epoch, self.index = epoch, index

    @staticmethod
    def split(indices: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, int]:
        """(this rank's contiguous part of the global batch, its offset in the batch)."""
        return split_batch(indices, rank, world_size)


class RankSampler(Sampler):
    """One worker's slice of every global batch, drawn from the examples only it holds (a
    directory of shards: ``files.ShardPlan``). Each rank walks its own seeded permutations,
    so its position after ``steps`` batches is known from ``steps`` alone: that count is the
    checkpointed state, and every rank restores its own position from it."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int, rank: int, world_size: int):
        base, extra = divmod(global_batch_size, world_size)
        self.offset = rank * base + min(rank, extra)
        super().__init__(num_examples, base + (1 if rank < extra else 0), seed)
        self.rank, self.steps = rank, 0

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            seeds = np.random.SeedSequence([self.seed, epoch, self.rank])
            self._order = np.random.Generator(np.random.Philox(seeds)).permutation(self.num_examples)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> np.ndarray:
        """This rank's slice of the next global batch (local example indices)."""
        self.steps += 1
        return super().next_batch()

    def split(self, indices: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, int]:
        """The slice is this rank's already; its offset in the global batch."""
        return indices, self.offset

    def state(self) -> dict[str, int]:
        return {"steps": self.steps}

    def set_state(self, state: Mapping[str, int]) -> None:
        if "steps" not in state:
            raise InvalidArgumentError(f"data position {dict(state)} was written by a job reading one dataset; "
                                       f"this job reads a directory of shards: resume it with that data")
        steps = int(state["steps"])
        if steps < 0:
            raise InvalidArgumentError(f"sampler state {dict(state)}: steps must be >= 0")
        self.steps = steps
        self.epoch, self.index = divmod(steps * self.global_batch_size, self.num_examples)


def split_batch(indices: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, int]:
    """Contiguous split by rank; the first ``len(indices) % world_size`` ranks get one extra."""
    if not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank {rank} out of range for world_size {world_size}")
    base, extra = divmod(len(indices), world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return indices[start:stop], start

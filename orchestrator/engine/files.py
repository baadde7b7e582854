"""Training data from the user's files: npz, npy, parquet or csv, on local disk or any fsspec URL.

    data: {format: parquet, path: s3://bucket/train.parquet, features: [a, b, c], labels: y,
           eval_path: s3://bucket/eval.parquet, storage_options: {...}}

- ``npz``: ``path`` is one ``.npz`` file; ``features``/``labels`` are its keys (x, y by default).
- ``npy``: ``path`` is a directory holding ``<features>.npy`` and ``<labels>.npy``.
- ``parquet``/``csv`` (read with pyarrow): ``labels`` is a column (y by default),
  ``features`` one column (numbers or fixed-length lists) or a list of numeric columns
  (null = every column but the labels).

The evaluation split is ``eval_path`` (same format), or ``eval_fraction`` of ``path``
held out by a fixed seeded permutation (the same split on every run), or none.
Files are read whole into memory and never unpickled (``allow_pickle=False``): this
mode is for data that fits one machine; the driver loads it once and the workers share
it through Ray's object store. A directory of parquet or npz shards is the sharded mode
(``ShardPlan``), where each worker reads only its own shards.
"""

from __future__ import annotations

import dataclasses
import io
import math
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint.storage import Storage
from orchestrator.engine.data import Dataset, DatasetError, check_same_length, from_arrays

FORMATS = ("npz", "npy", "parquet", "csv")
SHARDED_FORMATS = ("npz", "parquet")
DEFAULT_FEATURES, DEFAULT_LABELS = "x", "y"
EVAL_SPLIT_SEED = 0


@dataclass(frozen=True)
class FileSource:
    """Where the data is and which keys or columns hold it (the ``data`` config, plain)."""

    format: str
    path: str
    features: str | Sequence[str] | None = None
    labels: str | None = None
    eval_path: str | None = None
    eval_fraction: float | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None

    @property
    def label_key(self) -> str:
        return self.labels or DEFAULT_LABELS


def load_files(source: FileSource) -> Dataset | ShardPlan:
    """The whole dataset of ``source`` (see the module docstring), checked by ``from_arrays``;
    for a directory of shards, its checked ``ShardPlan`` (the workers read the data)."""
    if source.format not in FORMATS:
        raise DatasetError(f"data.format must be one of {FORMATS}, got {source.format!r}", "data.format")
    if is_sharded(source):
        return scan_shards(source)
    train = read_arrays(source, source.path, "data.path")
    test = None
    if source.eval_path:
        test = read_arrays(source, source.eval_path, "data.eval_path")
    elif source.eval_fraction is not None:
        check_same_length(*train, source.path)  # first: the split indexes both by the labels' rows, hiding a mismatch
        train, test = split_off(train, source.eval_fraction)
    return from_arrays(train, test, source.num_classes, source.path)


def split_off(arrays: tuple[np.ndarray, np.ndarray], fraction: float) -> tuple[tuple, tuple]:
    """(train, eval): ``fraction`` of the rows, picked by a permutation seeded with ``EVAL_SPLIT_SEED``."""
    x, y = arrays
    order = np.random.Generator(np.random.Philox(np.random.SeedSequence([EVAL_SPLIT_SEED]))).permutation(len(y))
    count = max(1, int(round(len(y) * fraction)))
    test, train = np.sort(order[:count]), np.sort(order[count:])
    return (x[train], y[train]), (x[test], y[test])


def read_arrays(source: FileSource, path: str, path_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one file (or one npy directory), unchecked."""
    storage, full = open_storage(path, source.storage_options, path_key)
    if source.format == "npy":
        return _read_npy_dir(storage, full, source, path_key)
    data = read_file(storage, full, path_key)
    if source.format == "npz":
        return read_npz(data, full, source)
    return table_arrays(read_table(data, full, source.format), full, source)


def open_storage(path: str, options: Mapping[str, Any], key: str) -> tuple[Storage, str]:
    try:
        return Storage.for_path(path, dict(options or {}))
    except (ImportError, ValueError, OSError) as exc:
        raise DatasetError(f"{path}: cannot open its filesystem: {type(exc).__name__}: {exc}", key) from None


def read_file(storage: Storage, path: str, key: str) -> bytes:
    """The bytes of ``path``; ``DatasetError`` at ``key`` when missing or unreadable."""
    try:
        if not storage.exists(path):
            raise DatasetError(f"{path}: no such file", key)
        if storage.isdir(path):
            raise DatasetError(f"{path} is a directory; expected a file", key)
        return storage.read_bytes(path)
    except DatasetError:
        raise
    except Exception as exc:  # PermissionError, network and credential errors from fsspec backends
        raise DatasetError(f"{path}: cannot read: {type(exc).__name__}: {exc}", key) from None


# --------------------------------------------------------------------------- npz / npy
def read_npz(data: bytes | Any, path: str, source: FileSource) -> tuple[np.ndarray, np.ndarray]:
    """The arrays of an npz archive given as bytes or as a file object (read member by member)."""
    try:
        archive = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file: {exc}", "data.path") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: holds a single array, not an .npz archive of named arrays", "data.path")
    with archive:
        features = _single_key(source.features, "npz")
        return (_npz_member(archive, features, path, "data.features"),
                _npz_member(archive, source.label_key, path, "data.labels"))


def _npz_member(archive: Any, key: str, path: str, config_key: str) -> np.ndarray:
    if key not in archive.files:
        raise DatasetError(f"{path}: no array {key!r}; it has {sorted(archive.files)}", config_key)
    try:
        return archive[key]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: array {key!r} cannot be read ({exc}); only numeric arrays are "
                           f"loaded, never pickled objects", config_key) from None


def _read_npy_dir(storage: Storage, directory: str, source: FileSource,
                  path_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not storage.isdir(directory):
        raise DatasetError(f"{directory}: format npy reads a directory holding <features>.npy and "
                           f"<labels>.npy; this is not a directory", path_key)
    arrays = []
    for key, config_key in ((_single_key(source.features, "npy"), "data.features"),
                            (source.label_key, "data.labels")):
        name = key if key.endswith(".npy") else key + ".npy"
        file = Storage.join(directory, name)
        if not storage.exists(file):
            present = [Storage.basename(p)[:-4] for p in storage.listdir(directory) if p.endswith(".npy")]
            raise DatasetError(f"{directory}: no {name}; the .npy arrays there are {sorted(present)}", config_key)
        arrays.append(_parse_npy(read_file(storage, file, path_key), file, config_key))
    return arrays[0], arrays[1]


def _parse_npy(data: bytes, path: str, key: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npy file of numbers: {exc}", key) from None


def _single_key(features: str | Sequence[str] | None, fmt: str) -> str:
    if features is None:
        return DEFAULT_FEATURES
    if isinstance(features, str):
        return features
    if len(features) == 1:
        return features[0]
    raise DatasetError(f"format {fmt} reads the features from one array: data.features must be one key, "
                       f"got {list(features)}", "data.features")


# --------------------------------------------------------------------------- parquet / csv
def read_table(data: bytes | Any, path: str, fmt: str, columns: Sequence[str] | None = None) -> Any:
    """A pyarrow Table of a parquet or csv file's bytes or file object (only ``columns`` of a parquet file)."""
    import pyarrow as pa

    data = pa.BufferReader(data) if isinstance(data, bytes) else data
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(data, columns=list(columns) if columns else None)
        import pyarrow.csv as pcsv

        return pcsv.read_csv(data)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable {fmt} file: {exc}", "data.path") from None


def table_arrays(table: Any, path: str, source: FileSource) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, ...], labels [N]) from the configured columns of ``table``."""
    names = list(table.column_names)
    label = source.label_key
    if label not in names:
        raise DatasetError(f"{path}: no column {label!r}; its columns are {names}", "data.labels")
    features = feature_columns(source.features, names, label, path)
    labels = _column_numpy(table.column(label), path, label, "data.labels")
    if len(features) == 1:
        x = _column_numpy(table.column(features[0]), path, features[0], "data.features")
    else:
        x = np.stack([_column_numpy(table.column(c), path, c, "data.features") for c in features], axis=1)
    return x, labels


def feature_columns(features: str | Sequence[str] | None, names: Sequence[str], label: str,
                    path: str) -> list[str]:
    """The feature column names, each checked to exist (null: every column but ``label``)."""
    if features is None:
        chosen = [n for n in names if n != label]
        if not chosen:
            raise DatasetError(f"{path}: no feature columns besides the labels {label!r}", "data.features")
        return chosen
    chosen = [features] if isinstance(features, str) else list(features)
    missing = [c for c in chosen if c not in names]
    if missing:
        raise DatasetError(f"{path}: no column(s) {missing}; its columns are {list(names)}", "data.features")
    return chosen


def _column_numpy(column: Any, path: str, name: str, key: str) -> np.ndarray:
    """A numeric column as [N], a list column (equal lengths) as [N, L]; nulls become NaN."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        lengths = set(np.asarray(column.value_lengths().fill_null(-1)).tolist())
        if len(lengths) > 1 or -1 in lengths:
            raise DatasetError(f"{path}: list column {name!r} has rows of different lengths {sorted(lengths)[:5]}",
                               key)
        flat = _numeric(column.flatten(), path, name, key)
        return flat.reshape(len(column), -1)
    return _numeric(column, path, name, key)


def _numeric(array: Any, path: str, name: str, key: str) -> np.ndarray:
    import pyarrow as pa

    kind = array.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise DatasetError(f"{path}: column {name!r} holds {kind}, not numbers", key)
    if array.null_count and not pa.types.is_floating(kind):
        array = array.cast(pa.float64())  # nulls -> NaN, caught by the NaN check with the row named
    return array.to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------- sharded directory
def is_sharded(source: FileSource) -> bool:
    """True when ``path`` is a directory of npz or parquet shard files (the sharded mode)."""
    if source.format not in SHARDED_FORMATS:
        return False
    storage, full = open_storage(source.path, source.storage_options, "data.path")
    try:
        return storage.isdir(full)
    except Exception as exc:  # credentials, network: the same error a single file would give
        raise DatasetError(f"{full}: cannot read: {type(exc).__name__}: {exc}", "data.path") from None


@dataclass(frozen=True)
class ShardView(Dataset):
    """The training examples of one worker's shards (and the whole evaluation set)."""

    rank: int = 0
    num_workers: int = 1


@dataclass(frozen=True)
class ShardPlan:
    """A directory of shard files, checked one shard at a time and never held whole.

    Small (names, row counts, the evaluation set): the driver sends it to the workers, and
    worker ``r`` of ``M`` reads only the shards ``r, r + M, r + 2M, ...`` (sorted by name),
    one at a time, into an array sized for its share: at most its share plus one shard in
    memory. Each worker draws its slice of every global batch from its own examples
    (``RankSampler``); the data position is the number of batches drawn, checkpointed.
    """

    source: FileSource
    shards: tuple[str, ...]
    rows: tuple[int, ...]
    feature_shape: tuple[int, ...]
    feature_dtype: str
    label_dtype: str
    classes: int | None
    test_x: np.ndarray
    test_y: np.ndarray

    def owned(self, rank: int, num_workers: int) -> list[int]:
        return list(range(rank, len(self.shards), num_workers))

    def rank_examples(self, rank: int, num_workers: int) -> int:
        return sum(self.rows[i] for i in self.owned(rank, num_workers))

    @property
    def num_examples(self) -> int:
        return sum(self.rows)

    def check_workers(self, global_batch_size: int, worker_counts: Sequence[int]) -> None:
        """Every worker of every count in ``worker_counts`` gets a shard and its slice of a batch."""
        from orchestrator.engine.data import split_batch

        for m in worker_counts:
            if len(self.shards) < m:
                raise DatasetError(f"{self.source.path}: {len(self.shards)} shard file(s) for {m} workers: "
                                   f"each worker reads its own shards, so give at least {m}", "data.path")
            for rank in range(m):
                wanted = len(split_batch(np.arange(global_batch_size), rank, m)[0])
                have = self.rank_examples(rank, m)
                if have < wanted:
                    raise DatasetError(f"must be <= what each worker's shards hold: with {m} workers, worker "
                                       f"{rank} has {have} example(s) but takes {wanted} per step (got "
                                       f"{global_batch_size})", "data.global_batch_size")

    def sample(self) -> Dataset:
        """The first shard with the evaluation set, checked as one dataset (model building, checks)."""
        storage, _ = open_storage(self.source.path, self.source.storage_options, "data.path")
        x, y = read_shard(storage, self.shards[0], self.source)
        return from_arrays((x, y), (self.test_x, self.test_y) if len(self.test_y) else None,
                           self.classes, self.source.path)

    def load_rank(self, rank: int, num_workers: int) -> ShardView:
        """Worker ``rank``'s examples: its shards read one at a time into one preallocated array."""
        storage, _ = open_storage(self.source.path, self.source.storage_options, "data.path")
        count = self.rank_examples(rank, num_workers)
        x = np.empty((count, *self.feature_shape), self.feature_dtype)
        y = np.empty(count, self.label_dtype)
        at = 0
        for i in self.owned(rank, num_workers):
            # unchecked (the driver checked every shard): a check's temporaries would cost memory
            part_x, part_y = read_shard(storage, self.shards[i], self.source, checked=False)
            rows = self.rows[i]
            if len(part_x) != rows or len(part_y) != rows or part_x.size != rows * math.prod(self.feature_shape):
                raise DatasetError(f"{self.shards[i]}: changed since the job started (features "
                                   f"{list(part_x.shape)}, labels {list(part_y.shape)}; it had {rows} rows of "
                                   f"{list(self.feature_shape)})", "data.path")
            x[at:at + rows] = part_x.reshape(rows, *self.feature_shape)  # casts in place, no copy of the shard
            y[at:at + rows] = part_y.reshape(rows)
            at += rows
            del part_x, part_y  # the next shard reuses the memory
        return ShardView(x, y, self.test_x, self.test_y, classes=self.classes, rank=rank, num_workers=num_workers)


def read_shard(storage: Storage, path: str, source: FileSource,
               checked: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one shard file, streamed (no copy of the file's bytes); ``checked``
    as ``from_arrays`` checks a split (lengths, dtypes, finite values)."""
    from orchestrator.engine.data import checked_examples

    try:
        with storage.open_read(path) as f:
            if source.format == "npz":
                x, y = read_npz(f, path, source)
            else:
                x, y = table_arrays(read_table(f, path, source.format), path, source)
    except DatasetError:
        raise
    except Exception as exc:  # PermissionError, network and credential errors from fsspec backends
        raise DatasetError(f"{path}: cannot read: {type(exc).__name__}: {exc}", "data.path") from None
    return checked_examples(x, y, path) if checked else (x, y)


def scan_shards(source: FileSource) -> ShardPlan:
    """Check every shard of the directory ``source.path``, one at a time, and plan the job's reads."""
    if source.eval_fraction is not None:
        raise DatasetError(f"{source.path} is a directory of shards, which is never held whole: "
                           f"give the evaluation set as eval_path (one file) instead", "data.eval_fraction")
    storage, directory = open_storage(source.path, source.storage_options, "data.path")
    suffix = "." + source.format
    shards = tuple(p for p in storage.listdir(directory) if p.endswith(suffix))
    if not shards:
        present = sorted(Storage.basename(p) for p in storage.listdir(directory))[:10]
        raise DatasetError(f"{directory}: no {suffix} shard files (format {source.format}); "
                           f"it holds {present}", "data.path")
    rows, shape, high = [], None, -1
    for path in shards:
        x, y = read_shard(storage, path, source)
        if shape is None:
            shape, x_dtype, y_dtype = x.shape[1:], x.dtype, y.dtype
        elif (x.shape[1:], x.dtype, y.dtype) != (shape, x_dtype, y_dtype):
            raise DatasetError(f"{path}: features [N, {', '.join(map(str, x.shape[1:]))}] {x.dtype} with "
                               f"{y.dtype} labels, but {shards[0]} has [N, {', '.join(map(str, shape))}] "
                               f"{x_dtype} with {y_dtype}: every shard must agree", "data.features")
        rows.append(len(y))
        if y.dtype.kind == "i" and len(y):
            low, high = int(y.min()), max(high, int(y.max()))
            if low < 0 or (source.num_classes is not None and high >= source.num_classes):
                value = low if low < 0 else high
                bound = f"[0, {source.num_classes})" if source.num_classes is not None else "[0, num_classes)"
                raise DatasetError(f"{path}: label {value} at row {int(np.flatnonzero(y == value)[0])} "
                                   f"is outside {bound}", "data.labels")
        del x, y
    test_x, test_y = np.zeros((0, *shape), x_dtype), np.zeros(0, y_dtype)
    if source.eval_path:
        test_x, test_y = read_arrays(source, source.eval_path, "data.eval_path")
    classes = source.num_classes
    if classes is None and y_dtype.kind == "i":
        classes = max(high, int(np.max(test_y, initial=0))) + 1
    plan = ShardPlan(source, shards, tuple(rows), tuple(int(d) for d in shape), x_dtype.str, y_dtype.str,
                     classes, test_x, test_y)
    checked = plan.sample()  # the evaluation set against the shards: shapes, dtypes, classes
    return dataclasses.replace(plan, test_x=checked.test_x, test_y=checked.test_y)

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
(``shards``), where each worker reads only its own shards.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.checkpoint.storage import Storage
from orchestrator.engine.data import Dataset, DatasetError, from_arrays

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


def load_files(source: FileSource) -> Dataset:
    """The whole dataset of ``source`` (see the module docstring), checked by ``from_arrays``."""
    if source.format not in FORMATS:
        raise DatasetError(f"data.format must be one of {FORMATS}, got {source.format!r}", "data.format")
    train = read_arrays(source, source.path, "data.path")
    test = None
    if source.eval_path:
        test = read_arrays(source, source.eval_path, "data.eval_path")
    elif source.eval_fraction is not None:
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
def read_npz(data: bytes, path: str, source: FileSource) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
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
def read_table(data: bytes, path: str, fmt: str, columns: Sequence[str] | None = None) -> Any:
    """A pyarrow Table of a parquet or csv file's bytes (only ``columns`` of a parquet file)."""
    import pyarrow as pa

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)
        import pyarrow.csv as pcsv

        return pcsv.read_csv(pa.BufferReader(data))
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

"""Datasets (digits, MNIST IDX through fsspec, synthetic) and the deterministic sampler."""

from __future__ import annotations

import gzip
import struct

from pathlib import Path

import numpy as np
import pytest

from orchestrator.checkpoint.storage import Storage
from orchestrator import rules
from orchestrator.engine.data import (MNIST_FILES, DatasetError, Sampler, load_dataset, parse_idx,
                                      split_batch)


# ------------------------------------------------------------------ digits / synthetic
def test_digits_is_scaled_split_and_stratified():
    ds = load_dataset("digits")
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int64
    assert ds.train_x.shape == (1438, 64) and ds.test_x.shape == (359, 64) and ds.input_dim == 64
    assert len(ds.train_y) == rules.DIGITS_TRAIN_EXAMPLES  # what the config checks global_batch_size against
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() == 1.0
    assert np.bincount(ds.test_y).min() >= 35                      # every class ~20% in test
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.test_x, again.test_x)
    rows = {r.tobytes() for r in ds.train_x}
    assert sum(r.tobytes() in rows for r in ds.test_x) < 5         # (digits has a few duplicate images)


def test_digits_are_the_examples_scikit_learn_loads_in_the_same_order():
    from sklearn.datasets import load_digits as sklearn_digits

    from orchestrator.engine.data import stratified_test_indices

    pixels, labels = sklearn_digits(return_X_y=True)
    test = stratified_test_indices(labels, 0.2, 0)
    train = np.setdiff1d(np.arange(len(labels)), test)
    ds = load_dataset("digits")
    assert ds.train_x.tobytes() == (pixels[train] / 16.0).astype(np.float32).tobytes()
    assert ds.test_x.tobytes() == (pixels[test] / 16.0).astype(np.float32).tobytes()
    assert ds.train_y.tolist() == labels[train].tolist() and ds.test_y.tolist() == labels[test].tolist()


def test_a_damaged_digits_file_is_named(tmp_path):
    from orchestrator.engine.data import read_digits_csv

    whole = gzip.compress(b"".join(b",".join([b"1"] * 64 + [b"3"]) + b"\n" for _ in range(4)))
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    narrow = tmp_path / "narrow.csv.gz"
    narrow.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(DatasetError, match="cut.csv.gz is unreadable"):
        read_digits_csv(str(cut))
    with pytest.raises(DatasetError, match="narrow.csv.gz has 3 columns"):
        read_digits_csv(str(narrow))
    good = tmp_path / "good.csv.gz"
    good.write_bytes(whole)
    assert read_digits_csv(str(good)).shape == (4, 65)


def test_starting_a_job_imports_neither_sklearn_nor_ml_dtypes():
    """Start-up cost every job and worker pays: the digits file is read without importing
    scikit-learn (scipy), and ml_dtypes waits for the first bfloat16 tensor."""
    import subprocess
    import sys

    code = ("import sys; import orchestrator.cli, orchestrator.cluster.worker; "
            "from orchestrator.engine.data import load_dataset; load_dataset('digits'); "
            "print(sorted(m for m in ('sklearn', 'scipy', 'ml_dtypes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_synthetic_is_deterministic_and_sized():
    a = load_dataset("synthetic", num_examples=300, input_dim=12, num_classes=4, seed=5)
    b = load_dataset("synthetic", num_examples=300, input_dim=12, num_classes=4, seed=5)
    c = load_dataset("synthetic", num_examples=300, input_dim=12, num_classes=4, seed=6)
    assert a.train_x.shape == (300, 12) and a.test_x.shape == (60, 12)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.train_y, b.train_y)
    assert not np.array_equal(a.train_x, c.train_x)
    assert set(np.unique(a.train_y)) == {0, 1, 2, 3}


def test_unknown_dataset_and_missing_mnist_path_are_named():
    with pytest.raises(DatasetError, match="'cifar'"):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match="mnist.*path"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match=r"'digits' does not take option\(s\) \['input_dim'\]"):
        load_dataset("digits", input_dim=64)


# ------------------------------------------------------------------ MNIST IDX
def _idx(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_mnist(storage: Storage, root: str, compress: bool, rng=np.random.default_rng(0)):
    arrays = {
        "train_x": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, 6).astype(np.uint8),
        "test_x": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, 3).astype(np.uint8),
    }
    storage.makedirs(root)
    for key, stem in MNIST_FILES.items():
        data = _idx(arrays[key], 0x08)
        name = stem + (".gz" if compress else "")
        storage.write_bytes(Storage.join(root, name), gzip.compress(data) if compress else data)
    return arrays


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_mnist_idx_files_load_from_any_filesystem(any_root, compress):
    root, options = any_root
    storage, path = Storage.for_path(root, options)
    path = Storage.join(path, "mnist")
    arrays = _write_mnist(storage, path, compress)
    ds = load_dataset("mnist", path=path, storage_options=options)
    assert ds.train_x.shape == (6, 784) and ds.train_x.dtype == np.float32
    np.testing.assert_array_equal(ds.train_x, arrays["train_x"].reshape(6, 784) / np.float32(255))
    np.testing.assert_array_equal(ds.test_y, arrays["test_y"].astype(np.int64))
    assert ds.train_y.dtype == np.int64


def test_idx_parser_reads_big_endian_types():
    values = np.array([[1, -2], [300, 4]], dtype=">i4")
    np.testing.assert_array_equal(parse_idx(_idx(values, 0x0C)), [[1, -2], [300, 4]])


@pytest.mark.parametrize("data, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "bad magic"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "type code 0x07"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "needs 5 data bytes"),
])
def test_idx_parser_errors_name_the_file(data, message):
    with pytest.raises(DatasetError, match=f"train-images.*{message}|{message}") as info:
        parse_idx(data, "/data/train-images-idx3-ubyte")
    assert "/data/train-images-idx3-ubyte" in str(info.value)


def test_mnist_missing_file_is_named(tmp_path):
    storage, path = Storage.for_path(str(tmp_path))
    _write_mnist(storage, path, compress=False)
    storage.rm(Storage.join(path, "t10k-labels-idx1-ubyte"))
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", path=path)


def test_mnist_corrupt_gzip_is_named(tmp_path):
    storage, path = Storage.for_path(str(tmp_path))
    _write_mnist(storage, path, compress=True)
    target = Storage.join(path, "train-labels-idx1-ubyte.gz")
    storage.write_bytes(target, storage.read_bytes(target)[:12])
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", path=path)


# ------------------------------------------------------------------ sampler
def test_each_epoch_is_a_permutation_determined_by_seed_and_epoch():
    sampler = Sampler(10, 5, seed=3)
    epoch0 = np.concatenate([sampler.next_batch(), sampler.next_batch()])
    epoch1 = np.concatenate([sampler.next_batch(), sampler.next_batch()])
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(epoch1, Sampler(10, 5, seed=3).order(1))
    assert not np.array_equal(epoch0, Sampler(10, 5, seed=4).order(0))


def test_batches_run_on_into_the_next_epoch():
    sampler = Sampler(7, 5, seed=0)
    first, second = sampler.next_batch(), sampler.next_batch()
    assert len(second) == 5 and sampler.state() == {"epoch": 1, "index": 3}
    np.testing.assert_array_equal(second, np.concatenate([sampler.order(0)[5:], sampler.order(1)[:3]]))
    assert len(first) == 5


def test_restored_state_continues_exactly():
    reference = Sampler(23, 4, seed=9)
    batches = [reference.next_batch() for _ in range(12)]
    resumed = Sampler(23, 4, seed=9)
    probe = Sampler(23, 4, seed=9)
    for _ in range(7):
        probe.next_batch()
    resumed.set_state(dict(probe.state()))
    for expected in batches[7:]:
        np.testing.assert_array_equal(resumed.next_batch(), expected)


def test_a_batch_larger_than_the_dataset_is_rejected():
    """The same rule, and words, as the job config's data.global_batch_size."""
    Sampler(10, 10, seed=0)
    with pytest.raises(ValueError, match=r"global_batch_size: must be <= the 10 training examples .*\(got 11\)"):
        Sampler(10, 11, seed=0)


def test_set_state_rejects_out_of_range_positions():
    with pytest.raises(ValueError, match="out of range"):
        Sampler(10, 2, seed=0).set_state({"epoch": 0, "index": 10})


@pytest.mark.parametrize("size, world_size", [(12, 3), (10, 4), (3, 5), (128, 7)])
def test_split_is_contiguous_balanced_and_complete(size, world_size):
    indices = np.arange(100, 100 + size)
    parts = [split_batch(indices, rank, world_size) for rank in range(world_size)]
    np.testing.assert_array_equal(np.concatenate([p for p, _ in parts]), indices)
    assert [offset for _, offset in parts] == list(np.cumsum([0] + [len(p) for p, _ in parts])[:-1])
    sizes = [len(p) for p, _ in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert Sampler.split(indices, world_size - 1, world_size)[1] == parts[-1][1]


def test_chars_are_next_character_windows_of_the_pydoc_text():
    from orchestrator.engine.data import python_docs_text, unigram_cross_entropy

    data = load_dataset("chars", context=16)
    text = python_docs_text()
    assert data.vocabulary == tuple(sorted(set(text))) and data.num_classes == len(data.vocabulary)
    assert data.train_x.shape[1] == data.train_y.shape[1] == 16 and data.train_x.dtype == np.int32
    decode = "".join
    first = decode(data.vocabulary[i] for i in data.train_x[3])
    assert first == text[3 * 8:3 * 8 + 16]                       # training windows start every context // 2
    assert decode(data.vocabulary[i] for i in data.train_y[3]) == text[3 * 8 + 1:3 * 8 + 17]
    held_out = text[int(len(text) * 0.9):]
    assert decode(data.vocabulary[i] for i in data.test_x[1]) == held_out[16:32]
    baseline = unigram_cross_entropy(data)
    assert 2.5 < baseline < np.log(data.num_classes)               # better than uniform, far from 0


def test_chars_from_a_text_file_and_their_errors(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("abcabcabd" * 20, encoding="utf-8")
    data = load_dataset("chars", path=str(path), context=4, eval_fraction=0.25)
    assert data.vocabulary == ("a", "b", "c", "d") and data.train_x.max() <= 3
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("chars", path=str(tmp_path / "missing.txt"), context=4)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9" * 50)
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset("chars", path=str(tmp_path / "latin1.txt"), context=4)
    with pytest.raises(DatasetError, match="too few"):
        load_dataset("chars", path=str(path), context=100)
    with pytest.raises(DatasetError, match="context"):
        load_dataset("chars", path=str(path), context=0)
    with pytest.raises(DatasetError, match=f"chars: cannot read text file {tmp_path}: IsADirectoryError"):
        load_dataset("chars", path=str(tmp_path), context=4)  # a directory: named, not a bare [Errno 21]


def test_train_on_a_chars_directory_names_data_path(tmp_path, capsys, monkeypatch):
    """Through the CLI: the error is located at data.path (exit 2), nothing is written."""
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    code = main(["train", str(quickstart), "--set", "data.dataset=chars", "--set", f"data.path={tmp_path / 'texts'}",
                 "--set", f"run_dir={tmp_path / 'run'}", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"error: --set data.path={tmp_path / 'texts'}: data.path: chars: cannot read text file"), err
    assert len(err.splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["texts"]

"""A directory of shard files (issue 12, sharded data mode): what the driver checks, what each
worker holds (measured with tracemalloc on the read the workers run), and the per-rank sampler
whose position survives a restore. The job itself: tests/cluster/test_shard_jobs.py."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from orchestrator.engine.data import RankSampler, Sampler, split_batch
from orchestrator.errors import InvalidArgumentError
from orchestrator.engine.files import FileSource, ShardPlan, load_files
from tests.plugin_fixtures import encode, make_arrays

SHARDS, ROWS, FEATURES = 8, 2000, 256
READ_BUFFER = 1 << 20  # numpy reads an npz member in 256 KiB pieces: a constant, not a shard


def write_shards(directory: Path, shards: int = SHARDS, rows: int = ROWS, features: int = FEATURES,
                 fmt: str = "npz") -> tuple[np.ndarray, np.ndarray]:
    """``shards`` files of ``rows`` examples each (float32 features, int64 labels in [0, 3))."""
    generator = np.random.default_rng(1)
    x = generator.random((shards * rows, features), dtype=np.float32)
    y = generator.integers(0, 3, shards * rows)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        part = slice(i * rows, (i + 1) * rows)
        (directory / f"part-{i:03d}.{fmt}").write_bytes(encode(fmt, x[part], y[part]))
    return x, y


def test_each_worker_holds_its_share_plus_at_most_one_shard(tmp_path):
    x, y = write_shards(tmp_path / "shards")
    shard_bytes = ROWS * (FEATURES * 4 + 8)
    tracemalloc.start()
    try:
        plan = load_files(FileSource("npz", str(tmp_path / "shards")))  # what the driver does
        driver_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(plan, ShardPlan) and plan.rows == (ROWS,) * SHARDS and plan.classes == 3
    assert driver_peak <= 2 * shard_bytes + READ_BUFFER, driver_peak  # one shard and its checks, never 8
    for rank, owned in enumerate([[0, 3, 6], [1, 4, 7], [2, 5]]):
        tracemalloc.start()
        try:
            view = plan.load_rank(rank, 3)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        rows = np.concatenate([np.arange(i * ROWS, (i + 1) * ROWS) for i in owned])
        assert np.array_equal(view.train_x, x[rows]) and np.array_equal(view.train_y, y[rows])  # only its shards
        share = view.train_x.nbytes + view.train_y.nbytes
        assert share == len(owned) * shard_bytes
        assert peak <= share + shard_bytes + READ_BUFFER, (rank, peak, share, shard_bytes)  # measured


def test_shards_in_parquet_read_the_same_examples(tmp_path):
    x, y = write_shards(tmp_path / "shards", shards=3, rows=50, features=4, fmt="parquet")
    plan = load_files(FileSource("parquet", str(tmp_path / "shards")))
    view = plan.load_rank(1, 2)
    assert np.array_equal(view.train_x, x[50:100]) and np.array_equal(view.train_y, y[50:100])


def test_rank_samplers_cover_the_global_batch_and_restore_from_the_step_count():
    batch, world = 10, 3
    samplers = [RankSampler(n, batch, 7, rank, world) for rank, n in enumerate((40, 33, 25))]
    sizes = [len(split_batch(np.arange(batch), rank, world)[0]) for rank in range(world)]
    for _ in range(9):  # past an epoch boundary of every rank
        for rank, sampler in enumerate(samplers):
            local, offset = sampler.split(sampler.next_batch(), rank, world)
            assert len(local) == sizes[rank] and offset == sum(sizes[:rank])
            assert local.max() < sampler.num_examples
    for rank, sampler in enumerate(samplers):
        state = sampler.state()
        again = RankSampler(sampler.num_examples, batch, 7, rank, world)
        again.set_state(state)  # what a restored worker does with the checkpointed record
        assert state == {"steps": 9}
        assert np.array_equal(again.next_batch(), sampler.next_batch())
    other_rank = RankSampler(40, batch, 7, 1, world)
    assert not np.array_equal(samplers[0].order(0), other_rank.order(0))  # each rank its own permutation


def test_data_num_classes_with_file_data(tmp_path):
    """data.num_classes given for file data (from_arrays passed it as the vocabulary: TypeError)."""
    x, y = make_arrays(40)
    (tmp_path / "d.npz").write_bytes(encode("npz", x, y))
    dataset = load_files(FileSource("npz", str(tmp_path / "d.npz"), num_classes=5))
    assert dataset.num_classes == 5 and dataset.vocabulary is None
    write_shards(tmp_path / "shards", shards=2, rows=20, features=3)
    plan = load_files(FileSource("npz", str(tmp_path / "shards"), num_classes=5))
    assert plan.classes == 5 and plan.sample().num_classes == 5


def test_shards_on_s3_are_listed_and_read_per_worker(s3_bucket, s3_options):
    from tests.plugin_fixtures import write_bytes

    x, y = make_arrays(90)
    for i in range(3):
        write_bytes(f"{s3_bucket}/shards/part-{i}.parquet", encode("parquet", x[i * 30:(i + 1) * 30],
                                                                    y[i * 30:(i + 1) * 30]), s3_options)
    source = FileSource("parquet", f"{s3_bucket}/shards", storage_options=s3_options)
    plan = load_files(source)
    assert [p.rsplit("/", 1)[1] for p in plan.shards] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    view = plan.load_rank(0, 2)
    assert np.array_equal(view.train_x, np.concatenate([x[:30], x[60:]]))
    assert np.array_equal(view.train_y, np.concatenate([y[:30], y[60:]]))


def test_a_data_position_of_the_other_mode_is_refused_by_name():
    with pytest.raises(InvalidArgumentError, match="directory of shards; this job reads one dataset"):
        Sampler(40, 10, 7).set_state(RankSampler(40, 10, 7, 0, 2).state())
    with pytest.raises(InvalidArgumentError, match="one dataset; this job reads a directory of shards"):
        RankSampler(40, 10, 7, 0, 2).set_state(Sampler(40, 10, 7).state())

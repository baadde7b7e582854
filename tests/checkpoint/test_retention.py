"""Retention policies decide with an injected ``now``; no files involved."""

from __future__ import annotations

import math

import pytest

from orchestrator.checkpoint.retention import (Action, BestK, EveryNHours, LatestN, ManagerRetention,
                                               SaverRetention, Tracked)


def run_manager(policy: ManagerRetention, times, last_preserved, metrics=None):
    """Drive ``policy`` like CheckpointManager.save does; returns (tracked, preserved, deleted)."""
    tracked, preserved, deleted = [], [], []
    for i, now in enumerate(times):
        tracked.append(Tracked(f"ckpt-{i}", now, (metrics or {}).get(i, {})))
        result = policy.sweep(tracked, last_preserved, now)
        last_preserved = result.last_preserved
        preserved += result.paths(Action.PRESERVE)
        deleted += result.paths(Action.DELETE)
        keep = set(result.paths(Action.KEEP))
        tracked = [t for t in tracked if t.path in keep]
    return [t.path for t in tracked], preserved, deleted


def test_latest_n_keeps_the_newest_and_zero_or_none_keeps_all():
    tracked = [Tracked(f"c{i}", float(i)) for i in range(7)]
    assert LatestN(3).keep(tracked) == {"c4", "c5", "c6"}
    assert LatestN(0).keep(tracked) == {t.path for t in tracked}
    assert LatestN(None).keep(tracked) == {t.path for t in tracked}


def test_max_to_keep_deletes_oldest_first_and_keeps_exactly_n():
    kept, preserved, deleted = run_manager(ManagerRetention(LatestN(5)), [float(t) for t in range(12)], -1.0)
    assert kept == [f"ckpt-{i}" for i in range(7, 12)]
    assert deleted == [f"ckpt-{i}" for i in range(7)]
    assert preserved == []


def test_every_n_hours_preserves_one_checkpoint_per_hour_like_tf():
    # saves every 20 minutes, 2 kept: TF preserves the first expired one at least 1 h after last_preserved
    times = [i * 1200.0 for i in range(16)]
    policy = ManagerRetention(LatestN(2), EveryNHours(1.0))
    kept, preserved, deleted = run_manager(policy, times, last_preserved=-1.0)
    assert kept == ["ckpt-14", "ckpt-15"]
    assert preserved == ["ckpt-3", "ckpt-6", "ckpt-9", "ckpt-12"]  # t = 1 h, 2 h, 3 h, 4 h
    assert set(deleted) == {f"ckpt-{i}" for i in range(14)} - set(preserved)


def test_sweep_reports_reasons_for_each_decision():
    policy = ManagerRetention(LatestN(2), EveryNHours(1.0), BestK("loss", 1))
    tracked = [Tracked("a", 0.0, {"loss": 0.1}), Tracked("b", 10.0, {"loss": 0.5}),
               Tracked("c", 4000.0, {"loss": 0.9}), Tracked("d", 4010.0, {"loss": 0.7}),
               Tracked("e", 4020.0, {"loss": 0.8})]
    result = policy.sweep(tracked, last_preserved=-10.0, now=4020.0)
    by_path = {d.path: d for d in result.decisions}
    assert by_path["a"].action is Action.KEEP and by_path["a"].reasons == ("best(loss)",)
    assert by_path["b"].action is Action.DELETE
    assert by_path["c"].action is Action.PRESERVE and by_path["c"].reasons == ("every-n-hours",)
    assert by_path["d"].reasons == ("latest-2",) and by_path["e"].reasons == ("latest-2",)
    assert result.last_preserved == 4000.0


@pytest.mark.parametrize("mode, best", [("min", {"ckpt-2", "ckpt-5"}), ("max", {"ckpt-7", "ckpt-9"})])
def test_keep_best_k_survives_the_latest_window(mode, best):
    losses = {0: 0.9, 1: 0.8, 2: 0.1, 3: 0.7, 4: 0.6, 5: 0.2, 6: 0.5, 7: 3.0, 8: 0.4, 9: 2.0}
    metrics = {i: {"loss": v} for i, v in losses.items()}
    policy = ManagerRetention(LatestN(1), None, BestK("loss", 2, mode))
    kept, _, deleted = run_manager(policy, [float(i) for i in range(10)], -1.0, metrics)
    assert set(kept) == best | {"ckpt-9"}
    assert set(deleted) == {f"ckpt-{i}" for i in range(10)} - set(kept)


def test_best_k_ignores_missing_and_nan_metrics_and_prefers_newer_on_ties():
    tracked = [Tracked("a", 0, {"loss": 1.0}), Tracked("b", 1, {}), Tracked("c", 2, {"loss": math.nan}),
               Tracked("d", 3, {"loss": 1.0})]
    assert BestK("loss", 1).keep(tracked) == {"d"}
    assert BestK("loss", 5).keep(tracked) == {"a", "d"}


def test_best_k_rejects_bad_configuration():
    with pytest.raises(ValueError, match="best_mode"):
        BestK("loss", 1, "lowest")
    with pytest.raises(ValueError, match="keep_best"):
        BestK("loss", 0)


def test_clock_going_backwards_keeps_instead_of_deleting():
    policy = ManagerRetention(LatestN(1), EveryNHours(1.0))
    tracked = [Tracked("old", 5000.0), Tracked("new", 1000.0)]  # clock jumped back 4000 s
    result = policy.sweep(tracked, last_preserved=0.0, now=1000.0)
    assert result.paths(Action.KEEP) == ["old", "new"]
    assert [d.reasons for d in result.decisions][0] == ("clock-went-backwards",)
    # once the clock has caught up, the normal rules apply again
    later = policy.sweep(tracked + [Tracked("newest", 6000.0)], last_preserved=0.0, now=6000.0)
    assert later.paths(Action.PRESERVE) == ["old"] and later.paths(Action.DELETE) == ["new"]


def test_last_preserved_in_the_future_blocks_deletion():
    policy = ManagerRetention(LatestN(1))
    result = policy.sweep([Tracked("a", 10.0), Tracked("b", 20.0)], last_preserved=10_000.0, now=20.0)
    assert result.paths(Action.DELETE) == []


def test_saver_retention_deletes_at_most_one_checkpoint_per_save():
    retention = SaverRetention.starting_at(0.0, max_to_keep=2, hours=10000.0)
    for i in range(4):
        retention.record(f"p{i}", float(i))
    assert [t.path for t in retention.last_checkpoints] == ["p2", "p3"]
    assert retention.state_paths("p3") == ["p2", "p3"]
    first = retention.next_deletion(4.0)
    assert (first.path, first.action) == ("p0", Action.DELETE)
    second = retention.next_deletion(4.0)
    assert (second.path, second.action) == ("p1", Action.DELETE)
    assert retention.next_deletion(4.0) is None


def test_saver_retention_preserves_after_next_checkpoint_time():
    retention = SaverRetention.starting_at(0.0, max_to_keep=1, hours=1.0)
    decisions = []
    for i, now in enumerate([0.0, 1800.0, 3700.0, 4000.0, 7300.0, 7400.0]):
        retention.record(f"p{i}", now)
        decision = retention.next_deletion(now)
        decisions.append(decision and (decision.path, decision.action))
    assert decisions == [None, ("p0", Action.DELETE), ("p1", Action.DELETE), ("p2", Action.PRESERVE),
                         ("p3", Action.DELETE), ("p4", Action.PRESERVE)]


def test_saver_retention_with_max_to_keep_zero_tracks_only_latest():
    retention = SaverRetention.starting_at(0.0, max_to_keep=0, hours=10000.0)
    retention.record("a", 1.0)
    retention.record("b", 2.0)
    assert retention.state_paths("b") == ["b"]
    assert retention.next_deletion(3.0) is None

"""Work units of a per-sample stage: large samples split into range groups, longest first, bounded."""

from __future__ import annotations

import random
import re

import pytest

from equislide.flows._common import (
    MIN_SPLIT_TILES,
    PLAN_WORKERS_ENV,
    plan_units,
    plan_workers,
    unit_label,
)
from equislide.storage import feature_shard_tiles


def _pieces(item):
    n = item[1]
    return [(a, min(n, a + 8)) for a in range(0, n, 8)]


def test_one_large_sample_is_cut_into_equal_range_groups_covering_every_tile_once():
    units = plan_units([(("big", 400), 400)], 2, pieces=_pieces)
    assert len(units) == 16 and all(len(u) == 1 for u in units)
    spans = sorted(r for u in units for r in u[0][1])
    assert spans == _pieces(("big", 400))  # every range once
    sizes = [sum(b - a for a, b in u[0][1]) for u in units]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 8
    assert unit_label(units[0]).startswith("big tiles ")


def test_mixed_cohort_is_longest_first_bounded_and_small_samples_stay_whole():
    rnd = random.Random(1)
    sizes = [rnd.choice([5, 20, 50]) for _ in range(997)] + [30000, 9000, 300]
    samples = [((f"s{i:04d}", n), n) for i, n in enumerate(sizes)]
    for workers in (1, 2, 16, 64):
        units = plan_units(samples, workers, pieces=_pieces)
        assert len(units) <= 3 * 2 * workers + 16 + 1, (workers, len(units))
        tiles = [sum(n if r is None else sum(b - a for a, b in r) for (_, n), r in u) for u in units]
        assert tiles == sorted(tiles, reverse=True) and sum(tiles) == sum(sizes)
        split = {item[0] for u in units for item, r in u if r is not None}
        assert ("s0997" in split) == (workers > 1)  # on 1 worker it is less than a unit's share
        assert not any(n < MIN_SPLIT_TILES for (sid, n), _ in samples if sid in split)
    tma = [((f"tma/A{i}", 4), 4) for i in range(6)]  # TMA cores: never split, grouped in order
    assert [unit_label(u) for u in plan_units(tma, 2, pieces=_pieces)] == [
        "tma/A0 .. tma/A1 (2 samples)",
        "tma/A2 .. tma/A3 (2 samples)",
        "tma/A4 .. tma/A5 (2 samples)",
    ]


def test_a_whole_slide_of_one_tile_shards_gives_a_large_cluster_one_unit_per_tile():
    """~50 tiles (a whole slide at 2.5 µm/px): one-tile feature shards (feature_shard_tiles) let a
    cluster of 32 workers run every tile at once; planned for 2 workers it stays at 16 units."""
    n = 49
    shard = feature_shard_tiles(n)
    ranges = [(a, min(n, a + shard)) for a in range(0, n, shard)]
    wide = plan_units([(("slide", n), n)], 32, pieces=lambda item: ranges)
    assert shard == 1 and len(wide) == n and sorted(u[0][1][0] for u in wide) == ranges
    assert len(plan_units([(("slide", n), n)], 2, pieces=lambda item: ranges)) == 16


def test_plan_workers_overrides_the_present_workers_and_refuses_a_bad_value(monkeypatch):
    monkeypatch.delenv(PLAN_WORKERS_ENV, raising=False)
    assert plan_workers(3) == 3 and plan_workers(0) == 1
    monkeypatch.setenv(PLAN_WORKERS_ENV, "32")
    assert plan_workers(2) == 32
    for bad in ("0", "-4", "many", "2.5"):
        monkeypatch.setenv(PLAN_WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=rf"^{PLAN_WORKERS_ENV}='{re.escape(bad)}': must be a positive"):
            plan_workers(2)

"""Features of one large sample in shard-aligned tile ranges: a killed run resumes range by range and
publishes the bytes an uninterrupted run writes."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from equislide import stages
from equislide.specs import FeatureSpec
from equislide.stages import features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _large import tiled_large_sample  # noqa: E402

SPEC = FeatureSpec(layer=1, model_kwargs={"width": 8}, calibration_tiles=4, device="cpu")


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict:
    """One generated sample of ~170 tiles (32 px at 4 µm/px), tiled, and its calibrated backbone."""
    return tiled_large_sample(tmp_path_factory.mktemp("large"), SPEC)


def _copy(large: dict, name: str) -> Path:
    dst = large["root"] / name / large["store"].name
    shutil.copytree(large["store"], dst)
    return dst


def _tree(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def test_a_large_sample_has_many_shard_aligned_ranges(large):
    from equislide.storage import feature_shard_tiles

    n, store = large["n"], large["store"]
    ranges = features.feature_ranges(store)
    shard = feature_shard_tiles(n)
    assert n >= 150 and len(ranges) >= 16
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))
    assert all(a % shard == 0 for a, _ in ranges)
    coarse = features.feature_ranges(store, range_tiles=shard + 1)  # rounded up to whole shards
    assert {b - a for a, b in coarse[:-1]} == {2 * shard}
    with pytest.raises(ValueError, match="range_tiles=0"):
        features.feature_ranges(store, range_tiles=0)


def test_killed_run_recomputes_only_missing_ranges_and_gives_identical_bytes(large):
    """A child process extracting every range is SIGKILLed after a few ranges; the rerun skips the
    finished ranges, computes the rest, and the published array is byte-identical to an uninterrupted
    single-process run on a copy of the same tiles."""
    from equislide.storage import done_feature_ranges, features_path, is_features_done

    killed, alone = _copy(large, "killed"), _copy(large, "alone")
    backbone, layer, params = large["backbone"], SPEC.layer, large["backbone"].params()
    ranges = features.feature_ranges(killed)
    # forkserver: a fork of a clean process (forking this one, torch threads started, may hang).
    child = multiprocessing.get_context("forkserver").Process(
        target=stages.extract_store_features, args=(killed, backbone, SPEC)
    )
    child.start()
    deadline = time.monotonic() + 300
    while len(done_feature_ranges(killed, layer, params=params)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    before = features.finished_feature_ranges(killed, backbone)
    assert 3 <= len(before) < len(ranges), "the kill came too late to test a resume"
    assert not is_features_done(killed, layer, params=params)
    with pytest.raises(Exception, match="not done"):
        features.publish_features(killed, backbone)

    res = stages.extract_store_features(killed, backbone, SPEC)
    redone = {(r["start"], r["stop"]) for r in res["ranges"] if r["status"] == "written"}
    skipped = {(r["start"], r["stop"]) for r in res["ranges"] if r["status"] == "skipped"}
    assert skipped == set(before) and redone == set(ranges) - set(before)
    assert res["published"] and res["tiles_done"] == sum(b - a for a, b in redone)
    assert features.finished_feature_ranges(killed, backbone) == ranges

    whole = stages.extract_store_features(alone, backbone, SPEC)
    assert whole["tiles_done"] == large["n"] and whole["status"] == "written"
    assert _tree(features_path(killed, layer)) == _tree(features_path(alone, layer))
    again = stages.extract_store_features(alone, backbone, SPEC)
    assert again["status"] == "skipped" and again["seconds"] == 0.0

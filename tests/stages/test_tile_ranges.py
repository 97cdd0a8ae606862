"""Range-parallel tiling of one sample: ranges in any order, in several processes, after a SIGKILL,
give a store byte-identical to write_samples'."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from equislide.specs import BATCH_TILES, TilingSpec
from equislide.stages.tile import (
    RANGE_SHARDS,
    plan_slide,
    publish_sample,
    sample_ranges,
    write_sample_range,
    write_samples,
)
from equislide.storage import (
    RANGES_DIR,
    IncompleteSampleError,
    open_sample_ranges,
    ranged_partial_path,
    tile_shard_tiles,
)
from equislide.tiling import write_phantom

SPEC = TilingSpec(tile=64, halo=8, tma="no")


def _tree_sha(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A phantom TMA tiled as one whole slide with small tiles: one sample of ~90 tiles (3 shards)."""
    path = tmp_path_factory.mktemp("ranges") / "wide.tiff"
    write_phantom(path, cores=6, seed=1, mpp=1.0, core_diameter_um=600)
    return path


@pytest.fixture(scope="module")
def reference(slide: Path, tmp_path_factory) -> tuple[object, dict[str, str]]:
    out = tmp_path_factory.mktemp("reference")
    plan = plan_slide(slide, out, SPEC)
    assert len(plan.todo) == 1 and plan.todo[0].grid.n_tiles > 2 * BATCH_TILES
    write_samples(plan.todo, out)
    return plan.todo[0], _tree_sha(out)


def test_sample_ranges_are_whole_shards(reference) -> None:
    sample, _ = reference
    n = sample.grid.n_tiles
    ranges = sample_ranges(sample, range_tiles=BATCH_TILES)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a % BATCH_TILES == 0 and b - a <= BATCH_TILES for a, b in ranges)
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))
    shard = tile_shard_tiles(n)
    step = RANGE_SHARDS * shard  # the default
    assert sample_ranges(sample) == [(a, min(n, a + step)) for a in range(0, n, step)]
    for bad in (0, 33, -32, 1.5, shard + 1):
        with pytest.raises(ValueError, match="range_tiles"):
            sample_ranges(sample, range_tiles=bad)


def test_ranges_in_reverse_order_are_byte_identical(reference, tmp_path: Path) -> None:
    sample, expected = reference
    ranges = sample_ranges(sample, range_tiles=BATCH_TILES)
    for start, stop in reversed(ranges[1:]):
        assert write_sample_range(sample, tmp_path, start, stop)["status"] == "written"
    with pytest.raises(IncompleteSampleError, match=rf"tiles \[0, {BATCH_TILES}\) of"):
        publish_sample(sample, tmp_path)
    assert write_sample_range(sample, tmp_path, *ranges[1])["status"] == "skipped"  # done already
    write_sample_range(sample, tmp_path, *ranges[0])
    result = publish_sample(sample, tmp_path)
    assert result.status == "written" and result.n_tiles == sample.grid.n_tiles
    assert _tree_sha(tmp_path) == expected
    # Published: every range and the publish itself are skipped, nothing changes.
    assert write_sample_range(sample, tmp_path, *ranges[0])["status"] == "skipped"
    assert publish_sample(sample, tmp_path).status == "skipped"
    assert _tree_sha(tmp_path) == expected


def test_bad_range_names_the_range(reference, tmp_path: Path) -> None:
    sample, _ = reference
    n = sample.grid.n_tiles
    for start, stop in ((5, 40), (0, 41), (32, n + 32), (64, 32)):
        with pytest.raises(ValueError, match=rf"\[{start}, {stop}\) is not a range of whole"):
            write_sample_range(sample, tmp_path, start, stop)


def test_ranges_in_two_processes_are_byte_identical(reference, tmp_path: Path) -> None:
    sample, expected = reference
    ranges = sample_ranges(sample, range_tiles=BATCH_TILES)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(write_sample_range, sample, tmp_path, a, b) for a, b in ranges]
        records = [f.result() for f in futures]
    assert [r["status"] for r in records] == ["written"] * len(ranges)
    assert publish_sample(sample, tmp_path).status == "written"
    assert _tree_sha(tmp_path) == expected


_CHILD = """
import os, pickle, sys, time
from equislide.stages.tile import write_sample_range
sample, out, start, stop, flag = pickle.load(open(sys.argv[1], "rb"))
def hang(_sid, done, _total):
    open(flag, "w").close()  # one shard written, the range not finished
    time.sleep(600)
write_sample_range(sample, out, start, stop, progress=hang)
"""


def test_killed_range_is_written_again_to_identical_bytes(reference, tmp_path: Path) -> None:
    sample, expected = reference
    out = tmp_path / "out"
    first, second = (0, 2 * BATCH_TILES), (2 * BATCH_TILES, sample.grid.n_tiles)
    assert write_sample_range(sample, out, *second)["status"] == "written"
    flag = tmp_path / "one-shard-written"
    job = tmp_path / "job.pkl"
    job.write_bytes(pickle.dumps((sample, out, *first, str(flag))))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(job)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.exists(), proc.stderr.read().decode() if proc.poll() is not None else "child too slow"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = ranged_partial_path(
        out, sample.sample_id, input_sha256=sample.input_sha256, params=sample.params
    )
    assert sorted(p.name for p in (partial / RANGES_DIR).iterdir()) == [f"{second[0]}-{second[1]}.json"]
    with pytest.raises(IncompleteSampleError, match=rf"tiles \[0, {first[1]}\)"):
        publish_sample(sample, out)
    records = [write_sample_range(sample, out, a, b) for a, b in (first, second)]
    assert [r["status"] for r in records] == ["written", "skipped"]
    publish_sample(sample, out)
    assert _tree_sha(out) == expected
    assert not any(p.name.startswith(f"{Path(sample.sample_id).name}.zarr.partial") for p in out.iterdir())


def test_partial_store_is_shared_and_a_stale_one_replaced(reference, tmp_path: Path) -> None:
    sample, _ = reference
    grid = sample.grid
    kwargs = dict(
        n_tiles=grid.n_tiles,
        tile=grid.tile,
        halo=grid.halo,
        coords=grid.l_xy,
        attrs=sample.attrs,
        params=sample.params,
        input_sha256=sample.input_sha256,
        shard_tiles=BATCH_TILES,
    )
    one = open_sample_ranges(tmp_path, sample.sample_id, **kwargs)
    one.mark_done(0, BATCH_TILES)
    two = open_sample_ranges(tmp_path, sample.sample_id, **kwargs)
    assert two.partial_path == one.partial_path and two.done_ranges() == [(0, BATCH_TILES)]
    # Same input and parameters, other metadata (another version's layout): stale, replaced.
    stale = open_sample_ranges(tmp_path, sample.sample_id, **{**kwargs, "attrs": {**sample.attrs, "x": 1}})
    assert stale.partial_path == one.partial_path and stale.done_ranges() == []


def test_rerun_keeps_finished_ranges_and_drops_other_keys(reference, tmp_path: Path) -> None:
    """A run's start-up cleaning keeps a range store (a rerun resumes it); a range store of other
    parameters is removed when this sample's range store is opened."""
    from equislide.storage import clean_partials, sample_store_path

    sample, expected = reference
    ranges = sample_ranges(sample, range_tiles=BATCH_TILES)
    write_sample_range(sample, tmp_path, *ranges[0])
    final = sample_store_path(tmp_path, sample.sample_id)
    other = final.with_name(final.name + ".partial-ranges-0123456789abcdef")
    other.mkdir()
    assert clean_partials(tmp_path) == []
    assert write_sample_range(sample, tmp_path, *ranges[0])["status"] == "skipped"
    for start, stop in ranges[1:]:
        write_sample_range(sample, tmp_path, start, stop)
    assert not other.exists()
    publish_sample(sample, tmp_path)
    assert _tree_sha(tmp_path) == expected

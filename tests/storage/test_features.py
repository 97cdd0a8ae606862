"""Features beside the tiles: layout, atomic in-place publishing, done-markers, resume, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from equislide.storage import (
    FEATURES_DONE_MARKER,
    FEATURES_FORMAT,
    FeaturesPublished,
    IncompleteSampleError,
    StoreLayoutError,
    done_feature_ranges,
    feature_shard_tiles,
    features_path,
    is_features_done,
    open_feature_ranges,
    open_features,
    open_features_for_write,
    open_sample_for_write,
    publish_feature_ranges,
    read_features_meta,
)

SHA = "cd" * 32
N, TILE, HALO = 5, 16, 8
ATTRS = {
    "backbone": "srenet18",
    "stride": 4,
    "halo_cropped": HALO,
    "normalisation": {"formula": "(rgb / 255 - mean) / std", "mean": [0.5] * 3, "std": [0.25] * 3},
    "weights": "random(seed=0)",
}
PARAMS = {"backbone": "srenet18", "layer": 3, "seed": 0}


def _store(root: Path, *, tile_params=None, n: int = N) -> Path:
    coords = np.array([[TILE * i, 0] for i in range(n)])
    with open_sample_for_write(
        root,
        "tma01/B3",
        n_tiles=n,
        tile=TILE,
        halo=HALO,
        attrs={"mpp": 1.0, "source_mpp": 0.5, "grid_shape": [1, n]},
        params=tile_params or {"tile": TILE},
        input_sha256=SHA,
    ) as w:
        w.write_tiles(0, np.full((n, TILE + 2 * HALO, TILE + 2 * HALO, 3), 200, np.uint8), coords)
        w.write_tissue_mask(np.ones((1, 5)), downsample=16)
    return root / "tma01" / "B3.zarr"


def _feats(seed: int = 0, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (n, 6, 4, 4)).astype(np.float32)


def _write(store: Path, feats: np.ndarray, params=PARAMS, batch: int = 2) -> Path:
    with open_features_for_write(store, 3, channels=6, f_tile=4, attrs=ATTRS, params=params) as w:
        for s in range(0, N, batch):
            w.write(s, feats[s : s + batch])
    return w.path


def test_round_trip_layout_and_attrs(tmp_path):
    store = _store(tmp_path)
    assert not is_features_done(store, 3, params=PARAMS)  # tiles done, features not: resumable
    feats = _feats()
    path = _write(store, feats)
    assert path == features_path(store, 3) == store / "features" / "layer3"
    assert is_features_done(store, 3, params=PARAMS)
    assert not is_features_done(store, 3, params={**PARAMS, "seed": 1})
    assert not is_features_done(store, 2, params=PARAMS)

    g = zarr.open_group(store, mode="r")
    arr = g["features/layer3"]
    assert arr.dtype == np.float16 and arr.shape == (N, 6, 4, 4)
    assert arr.chunks == (1, 6, 4, 4) and arr.shards == (N, 6, 4, 4)
    meta = arr.attrs["equislide_features"]
    assert meta["format"] == FEATURES_FORMAT and meta["layer"] == 3 and meta["stride"] == 4
    assert meta["halo_cropped"] == HALO and meta["weights"] == "random(seed=0)" and meta["params"] == PARAMS
    np.testing.assert_array_equal(arr[:], feats.astype(np.float16))
    assert sorted(p.name for p in (store / "features").iterdir()) == ["layer3", "zarr.json"]

    d = open_features(store, 3, tiles_per_chunk=2)
    assert d.chunks[0] == (2, 2, 1) and d.dtype == np.float16
    np.testing.assert_array_equal(d.compute(), feats.astype(np.float16))
    assert read_features_meta(store, 3)["shape"] == (N, 6, 4, 4)
    marker = json.loads((path / FEATURES_DONE_MARKER).read_text())
    assert marker["sample_id"] == "tma01/B3" and marker["tiles_input_sha256"] == SHA


def test_crash_leaves_only_a_partial_that_is_ignored_and_cleaned(tmp_path):
    store = _store(tmp_path)
    w = open_features_for_write(store, 3, channels=6, f_tile=4, attrs=ATTRS, params=PARAMS)
    w.write(0, _feats()[:2])  # then the process "dies": no finalize, no abort
    assert w.partial_path.is_dir() and not features_path(store, 3).exists()
    assert not is_features_done(store, 3, params=PARAMS)
    with pytest.raises(StoreLayoutError, match="missing or unfinished"):
        open_features(store, 3)
    _write(store, _feats())  # the rerun removes the stale partial
    assert not w.partial_path.exists() and is_features_done(store, 3, params=PARAMS)


def test_incomplete_finalize_and_exception_abort(tmp_path):
    store = _store(tmp_path)
    w = open_features_for_write(store, 3, channels=6, f_tile=4, attrs=ATTRS, params=PARAMS)
    w.write(0, _feats()[:3])
    with pytest.raises(IncompleteSampleError, match="2 of 5 tiles not written"):
        w.finalize()
    w.abort()
    assert not w.partial_path.exists()
    w2 = open_features_for_write(store, 3, channels=6, f_tile=4, attrs=ATTRS, params=PARAMS)
    with pytest.raises(RuntimeError, match="boom"), w2:
        raise RuntimeError("boom")
    assert not w2.partial_path.exists() and not features_path(store, 3).exists()


def test_rewrite_with_new_params_replaces_old_features(tmp_path):
    store = _store(tmp_path)
    _write(store, _feats(0))
    new = {**PARAMS, "seed": 7}
    _write(store, _feats(1), params=new)
    assert is_features_done(store, 3, params=new) and not is_features_done(store, 3, params=PARAMS)
    np.testing.assert_array_equal(open_features(store, 3).compute(), _feats(1).astype(np.float16))
    assert sorted(p.name for p in (store / "features").iterdir()) == ["layer3", "zarr.json"]


def test_features_of_an_older_tiling_are_not_done(tmp_path):
    store = _store(tmp_path)
    _write(store, _feats())
    done = json.loads((store / "_equislide_done.json").read_text())
    done["params_sha256"] = "0" * 64  # the tiles were redone with other parameters
    (store / "_equislide_done.json").write_text(json.dumps(done))
    assert not is_features_done(store, 3, params=PARAMS)


def test_refuses_values_float16_cannot_hold_and_bad_metadata(tmp_path):
    store = _store(tmp_path)
    w = open_features_for_write(store, 3, channels=6, f_tile=4, attrs=ATTRS, params=PARAMS)
    bad = _feats()[:1].copy()
    bad[0, 0, 0, 0] = 1e7
    with pytest.raises(ValueError, match="float16 max"):
        w.write(0, bad)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        w.write(0, bad)
    with pytest.raises(ValueError, match=r"float \(k, 6, 4, 4\)"):
        w.write(0, _feats()[:1, :5])
    w.abort()
    with pytest.raises(ValueError, match="'weights'"):
        open_features_for_write(
            store, 3, channels=6, f_tile=4, attrs={k: v for k, v in ATTRS.items() if k != "weights"}
        )
    with pytest.raises(ValueError, match="store's tile=16"):
        open_features_for_write(store, 3, channels=6, f_tile=3, attrs=ATTRS)
    with pytest.raises(ValueError, match="halo"):
        open_features_for_write(store, 3, channels=6, f_tile=4, attrs={**ATTRS, "halo_cropped": 0})
    with pytest.raises(StoreLayoutError):
        open_features_for_write(tmp_path / "nope.zarr", 3, channels=6, f_tile=4, attrs=ATTRS)


def test_same_features_give_byte_identical_files(tmp_path):
    a, b = _store(tmp_path / "a"), _store(tmp_path / "b")
    _write(a, _feats(), batch=2)
    _write(b, _feats(), batch=5)

    def tree(p: Path) -> dict[str, bytes]:
        return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}

    assert tree(a / "features") == tree(b / "features")


def _tree(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def _ranges(store: Path, **kw):
    return open_feature_ranges(store, 3, channels=6, f_tile=4, attrs=ATTRS, params=PARAMS, **kw)


def _fill(store: Path, feats: np.ndarray, ranges: list[tuple[int, int]]) -> None:
    w = _ranges(store)
    for a, b in ranges:
        w.write(a, feats[a:b])
        w.mark_done(a, b)


def test_shard_size_gives_a_large_sample_many_ranges():
    sizes = (0, 1, 49, 64, 65, 129, 300, 2048, 2049, 10**6)
    # Up to 64 tiles (a whole slide at 2.5 µm/px is ~50) every tile is a shard: one range per tile.
    assert [feature_shard_tiles(n) for n in sizes] == [1, 1, 1, 1, 2, 3, 5, 32, 32, 32]


def test_range_writers_share_one_partial_and_publish_when_every_range_is_done(tmp_path):
    n = 198  # shard = ceil(198 / 64) = 4 tiles
    store, feats = _store(tmp_path, n=n), _feats(2, n)
    first, second = _ranges(store), _ranges(store)
    assert first.partial_path == second.partial_path and first.shard_tiles == 4
    first.write(0, feats[:8])
    first.mark_done(0, 8)
    second.write(196, feats[196:])  # the last shard may be short
    second.mark_done(196, 198)
    assert done_feature_ranges(store, 3, params=PARAMS) == [(0, 8), (196, 198)]
    assert _ranges(store).is_done(4, 8) and not _ranges(store).is_done(4, 12)  # reopened, not reset
    with pytest.raises(ValueError, match="not whole shards of 4 tiles"):
        first.write(6, feats[6:10])
    with pytest.raises(IncompleteSampleError, match=r"tiles \[8, 12\) were not written here"):
        second.mark_done(8, 12)
    with pytest.raises(IncompleteSampleError, match=r"188 of 198 tiles not done \(tiles \[8, 196\)\)"):
        publish_feature_ranges(store, 3, params=PARAMS)
    assert not is_features_done(store, 3, params=PARAMS)
    second.write(8, feats[8:196])
    second.mark_done(8, 196)
    assert publish_feature_ranges(store, 3, params=PARAMS) == features_path(store, 3)
    assert is_features_done(store, 3, params=PARAMS) and not first.partial_path.exists()
    np.testing.assert_array_equal(open_features(store, 3).compute(), feats.astype(np.float16))
    published = sorted(p.name for p in features_path(store, 3).iterdir())
    assert published == [FEATURES_DONE_MARKER, "c", "zarr.json"]  # no range bookkeeping left
    assert publish_feature_ranges(store, 3, params=PARAMS) == features_path(store, 3)  # done: as it is
    with pytest.raises(FeaturesPublished):  # a late writer starts no partial that nobody publishes
        _ranges(store)
    assert sorted(p.name for p in (store / "features").iterdir()) == ["layer3", "zarr.json"]


def test_stale_partials_are_removed_and_changed_metadata_starts_over(tmp_path):
    store = _store(tmp_path, n=20)
    old = open_features_for_write(store, 3, channels=6, f_tile=4, attrs=ATTRS, params=PARAMS)
    other = open_feature_ranges(store, 3, channels=6, f_tile=4, attrs=ATTRS, params={**PARAMS, "seed": 9})
    assert not old.partial_path.exists() and other.partial_path.is_dir()
    mine = _ranges(store)
    assert not other.partial_path.exists() and mine.partial_path.is_dir()
    mine.write(0, _feats(0, 20)[:4])
    mine.mark_done(0, 4)
    changed = open_feature_ranges(
        store, 3, channels=6, f_tile=4, attrs={**ATTRS, "weights": "sha256:" + "0" * 64}, params=PARAMS
    )
    assert changed.partial_path == mine.partial_path and changed.done_ranges() == []
    with pytest.raises(IncompleteSampleError, match="no range written yet"):
        publish_feature_ranges(_store(tmp_path / "fresh", n=4), 3, params=PARAMS)


def _fill_in_child(store: str, seed: int, n: int, ranges: list[tuple[int, int]]) -> None:
    _fill(Path(store), _feats(seed, n), ranges)


def test_processes_filling_ranges_at_once_give_the_single_writer_bytes(tmp_path):
    """Two processes fill alternate ranges of one array at the same time; the published array is
    byte-identical to one process filling it range by range."""
    import multiprocessing

    n = 256  # shard = 4 tiles, 64 ranges
    shared, alone = _store(tmp_path / "shared", n=n), _store(tmp_path / "alone", n=n)
    ranges = [(a, a + 4) for a in range(0, n, 4)]
    ctx = multiprocessing.get_context("fork")
    children = [
        ctx.Process(target=_fill_in_child, args=(str(shared), 4, n, ranges[i::2])) for i in range(2)
    ]
    for c in children:
        c.start()
    for c in children:
        c.join(60)
    assert [c.exitcode for c in children] == [0, 0]
    publish_feature_ranges(shared, 3, params=PARAMS)
    _fill(alone, _feats(4, n), ranges)
    publish_feature_ranges(alone, 3, params=PARAMS)
    assert _tree(features_path(shared, 3)) == _tree(features_path(alone, 3))

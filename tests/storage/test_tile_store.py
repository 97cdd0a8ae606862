"""The per-sample zarr tile store: layout, round trip, atomicity, resume and determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from equislide.storage import (
    DONE_MARKER,
    STORE_FORMAT,
    IncompleteSampleError,
    StoreLayoutError,
    clean_partials,
    is_sample_done,
    open_sample_for_write,
    open_tiles,
    read_sample_meta,
    sha256_file,
)

SHA = "ab" * 32
PARAMS = {"tile": 16, "halo": 2, "mpp": 1.0, "backbone": "srenet18", "levels": [1, 2]}
ATTRS = {"source_path": "/data/tma01.tiff", "mpp": 1.0, "source_mpp": 0.5, "grid_shape": [5, 8]}


def _data(n: int = 40, t: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (n, t, t, 3), dtype=np.uint8)
    tiles[:, :4] = 240  # some compressible content
    coords = np.stack(np.meshgrid(np.arange(8) * 16, np.arange(5) * 16), -1).reshape(-1, 2)[:n]
    return tiles, coords


def _write(root: Path, *, batch: int = 16, sample_id: str = "tma01/B3", params=PARAMS, finalize=True):
    tiles, coords = _data()
    w = open_sample_for_write(
        root, sample_id, n_tiles=len(tiles), tile=16, halo=2, attrs=ATTRS, params=params, input_sha256=SHA
    )
    for s in range(0, len(tiles), batch):
        w.write_tiles(s, tiles[s : s + batch], coords[s : s + batch])
    w.write_tissue_mask(np.eye(10, 12, dtype=bool), downsample=8.0)
    if finalize:
        w.finalize()
    return w, tiles, coords


def _tree_hashes(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def test_round_trip_and_plain_zarr_layout(tmp_path):
    w, tiles, coords = _write(tmp_path)
    store = tmp_path / "tma01" / "B3.zarr"
    assert w.path == store and store.is_dir()
    assert [p.name for p in (tmp_path / "tma01").iterdir()] == ["B3.zarr"]  # no partial left

    g = zarr.open_group(store, mode="r")
    assert g.metadata.zarr_format == 3
    t = g["tiles"]
    assert t.dtype == np.uint8 and t.shape == (40, 20, 20, 3)
    assert t.chunks == (1, 20, 20, 3) and t.shards == (32, 20, 20, 3)
    assert type(t.compressors[0]).__name__ == "ZstdCodec"
    np.testing.assert_array_equal(t[:], tiles)
    assert g["coords"].dtype == np.int64
    np.testing.assert_array_equal(g["coords"][:], coords)
    assert g["tissue_mask"].dtype == np.uint8 and g["tissue_mask"].attrs["downsample"] == 8.0
    np.testing.assert_array_equal(g["tissue_mask"][:], np.eye(10, 12, dtype=np.uint8))
    meta = g.attrs["equislide"]
    assert meta["format"] == STORE_FORMAT and meta["sample_id"] == "tma01/B3"
    assert (meta["tile"], meta["halo"], meta["tile_with_halo"], meta["n_tiles"]) == (16, 2, 20, 40)
    assert meta["mpp"] == 1.0 and meta["source_mpp"] == 0.5 and meta["grid_shape"] == [5, 8]
    assert meta["source_sha256"] == SHA and meta["source_path"] == "/data/tma01.tiff"
    assert meta["params"] == json.loads(json.dumps(PARAMS)) and meta["equislide_version"]
    # 40 tiles in shards of 32: two shard files on disk, not 40 chunk files.
    assert sorted(
        p.relative_to(store / "tiles").as_posix() for p in (store / "tiles" / "c").rglob("*") if p.is_file()
    ) == [
        "c/0/0/0/0",
        "c/1/0/0/0",
    ]


def test_readers(tmp_path):
    _, tiles, _ = _write(tmp_path)
    store = tmp_path / "tma01" / "B3.zarr"
    meta = read_sample_meta(store)
    assert meta["tiles_shape"] == (40, 20, 20, 3) and meta["tissue_mask_downsample"] == 8.0
    assert meta["done"]["input_sha256"] == SHA and meta["done"]["sample_id"] == "tma01/B3"
    d = open_tiles(store)
    assert d.shape == tiles.shape and d.dtype == np.uint8 and d.chunks[0] == (1,) * 40
    np.testing.assert_array_equal(d.compute(), tiles)
    d8 = open_tiles(store, tiles_per_chunk=8)
    assert d8.chunks[0] == (8,) * 5
    np.testing.assert_array_equal(d8[5:13].compute(), tiles[5:13])


def test_crash_leaves_only_a_partial_that_is_ignored_and_cleaned(tmp_path):
    w, _, _ = _write(tmp_path, finalize=False)  # the process "dies" here: no finalize, no abort
    assert not (tmp_path / "tma01" / "B3.zarr").exists()
    assert w.partial_path.is_dir() and ".partial-" in w.partial_path.name
    assert not is_sample_done(tmp_path, "tma01/B3", input_sha256=SHA, params=PARAMS)
    with pytest.raises(StoreLayoutError, match="partial"):
        read_sample_meta(w.partial_path)

    w2, _, _ = _write(tmp_path)  # the rerun's writer removes the stale partial first
    assert not w.partial_path.exists()
    assert sorted(p.name for p in (tmp_path / "tma01").iterdir()) == ["B3.zarr"]
    assert is_sample_done(tmp_path, "tma01/B3", input_sha256=SHA, params=PARAMS)


def test_clean_partials_and_abort(tmp_path):
    w1, _, _ = _write(tmp_path, sample_id="s1", finalize=False)
    w2, _, _ = _write(tmp_path, sample_id="tma01/B3", finalize=False)
    removed = clean_partials(tmp_path)
    assert removed == sorted([w1.partial_path, w2.partial_path])
    assert not w1.partial_path.exists() and not w2.partial_path.exists()

    with (
        pytest.raises(RuntimeError, match="boom"),
        open_sample_for_write(tmp_path, "s2", n_tiles=1, tile=4) as w,
    ):
        w.write_tiles(0, np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 2), int))
        raise RuntimeError("boom")
    assert not w.partial_path.exists() and not (tmp_path / "s2.zarr").exists()


def test_finalize_refuses_incomplete_samples(tmp_path):
    tiles, coords = _data()
    w = open_sample_for_write(tmp_path, "s", n_tiles=40, tile=16, halo=2)
    w.write_tiles(0, tiles[:39], coords[:39])
    with pytest.raises(IncompleteSampleError, match="1 of 40 tiles"):
        w.finalize()
    w.write_tiles(39, tiles[39:])
    with pytest.raises(IncompleteSampleError, match="coordinates"):
        w.finalize()
    w.write_coords(coords)
    assert w.finalize() == tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="finalized"):
        w.write_tiles(0, tiles[:1])


def test_bad_inputs_name_the_value(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \(k, 20, 20, 3\)"):
        w = open_sample_for_write(tmp_path, "s", n_tiles=4, tile=16, halo=2)
        w.write_tiles(0, np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="out of range"):
        w.write_tiles(3, np.zeros((2, 20, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="mpp"):
        open_sample_for_write(tmp_path, "t", n_tiles=1, tile=4, attrs={"mpp": -1})
    with pytest.raises(ValueError, match="filled in by the store"):
        open_sample_for_write(tmp_path, "t", n_tiles=1, tile=4, attrs={"tile": 3})
    with pytest.raises(ValueError, match="source_sha256"):
        open_sample_for_write(tmp_path, "t", n_tiles=1, tile=4, input_sha256="abc")


def test_is_sample_done_depends_on_input_and_params(tmp_path):
    assert not is_sample_done(tmp_path, "tma01/B3", input_sha256=SHA, params=PARAMS)
    _write(tmp_path)
    assert is_sample_done(tmp_path, "tma01/B3", input_sha256=SHA, params=dict(reversed(PARAMS.items())))
    assert not is_sample_done(tmp_path, "tma01/B3", input_sha256="cd" * 32, params=PARAMS)
    assert not is_sample_done(tmp_path, "tma01/B3", input_sha256=SHA, params={**PARAMS, "halo": 3})
    assert not is_sample_done(tmp_path, "tma01/B4", input_sha256=SHA, params=PARAMS)
    marker = json.loads((tmp_path / "tma01" / "B3.zarr" / DONE_MARKER).read_text())
    assert marker["input_sha256"] == SHA and len(marker["params_sha256"]) == 64


def test_rewrite_replaces_an_older_store(tmp_path):
    _write(tmp_path, params=PARAMS)
    _write(tmp_path, params={**PARAMS, "halo": 9})
    assert is_sample_done(tmp_path, "tma01/B3", input_sha256=SHA, params={**PARAMS, "halo": 9})
    assert not is_sample_done(tmp_path, "tma01/B3", input_sha256=SHA, params=PARAMS)
    assert sorted(p.name for p in (tmp_path / "tma01").iterdir()) == ["B3.zarr"]


def test_reruns_are_byte_identical_whatever_the_batching(tmp_path):
    _write(tmp_path / "a", batch=16)
    _write(tmp_path / "b", batch=16)
    _write(tmp_path / "c", batch=5)  # unaligned batches rewrite shards; the result must not change
    a, b, c = (_tree_hashes(tmp_path / r / "tma01" / "B3.zarr") for r in "abc")
    assert len(a) >= 6 and a == b == c
    _write(tmp_path / "d", params={**PARAMS, "halo": 3})
    d = _tree_hashes(tmp_path / "d" / "tma01" / "B3.zarr")
    assert d["zarr.json"] != a["zarr.json"] and d[DONE_MARKER] != a[DONE_MARKER]


def test_not_a_store(tmp_path):
    with pytest.raises(StoreLayoutError, match=DONE_MARKER):
        open_tiles(tmp_path)


def test_sha256_file_streams(tmp_path):
    p = tmp_path / "x.bin"
    data = np.random.default_rng(1).bytes(3_000_001)
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest() == sha256_file(p, chunk=4096)
    assert sha256_file(tmp_path / "x.bin", chunk=7) == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="chunk"):
        sha256_file(p, chunk=0)


def test_unsafe_sample_ids_are_refused_before_touching_disk(tmp_path):
    from equislide.storage import SampleIdError

    for bad in ("../escape", "tma01/../../x", "/abs", "a b"):
        with pytest.raises(SampleIdError, match="safe_sample_id"):
            open_sample_for_write(tmp_path / "root", bad, n_tiles=1, tile=4)
    assert not list(tmp_path.iterdir())


def test_tile_shard_tiles_spreads_a_small_whole_slide():
    """A whole slide at 2.5 µm/px (~50 tiles) gets 4-tile shards, so its tile stage has 13 units to hand
    out; large samples keep 32-tile shards; never a shard of 1 tile (a file per tile of a TMA core)."""
    from equislide.storage import tile_shard_tiles

    sizes = [0, 1, 49, 256, 257, 1000, 2048, 2049, 10**6]
    assert [tile_shard_tiles(n) for n in sizes] == [4, 4, 4, 4, 5, 16, 32, 32, 32]

"""The segment stage of one large sample in shard-aligned tile ranges: ranges written by several
processes into one partial label array, the outputs built from it a band at a time, equal to the
single-process :func:`segment_store`'s; a killed run resumes range by range."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from shapely.geometry import shape

from equislide import stages
from equislide.specs import ClusterSpec, FeatureSpec
from equislide.stages import segment
from equislide.storage.label_ranges import PARTIAL_SUFFIX

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _large import write_large_image  # noqa: E402

SPEC = FeatureSpec(layer=1, model_kwargs={"width": 8}, calibration_tiles=4, device="cpu")
CLUSTER = ClusterSpec(k=4, per_sample=500, backend="torch")
# Bands of 24 label rows: the 256-row map of the sample is stitched, traced and read in 11 bands, so
# every output crosses band borders many times.
BAND = 24


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict:
    """One generated sample of ~170 tiles (32 px at 4 µm/px) with layer-1 features, and the
    single-process reference outputs of :func:`segment_store` (the sample fitted alone)."""
    root = tmp_path_factory.mktemp("segranges")
    image = write_large_image(root / "large.tiff")
    [res] = stages.tile_slide(image, root / "tiles", mpp=4.0, input_mpp=1.0, tile=32, halo=8)
    backbone = stages.calibrated_backbone([res.store], root / "models", SPEC)
    stages.extract_store_features(res.store, backbone, SPEC)
    reference = segment.segment_store(res.store, root / "reference", layer=SPEC.layer, spec=CLUSTER)
    return {"root": root, "store": Path(res.store), "n": res.n_tiles, "reference": reference}


def _tree(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def _polygons(path: str) -> dict[int, list[str]]:
    """Each feature's polygons as normalised WKT, sorted: the geometry up to the polygons' order."""
    doc = json.loads(Path(path).read_text())
    out = {}
    for feature in doc["features"]:
        geometry = shape(feature["geometry"])
        assert shapely.is_valid(geometry), shapely.is_valid_reason(geometry)
        out[feature["properties"]["label_value"]] = sorted(
            shapely.to_wkt(shapely.normalize(p), rounding_precision=-1) for p in shapely.get_parts(geometry)
        )
    return out


def _same_outputs(got: dict, want: dict) -> None:
    """OME-Zarr bytes, overlay PNG bytes, K-means bytes, label counts, GeoJSON bytes (and so its
    geometry, checked valid) equal."""
    assert got["label_counts"] == want["label_counts"]
    assert got["shape"] == want["shape"] and got["kmeans_sha256"] == want["kmeans_sha256"]
    a, b = Path(got["outputs"]["ome_zarr"]), Path(want["outputs"]["ome_zarr"])
    tree_a, tree_b = _tree(a), _tree(b)
    assert any(k.startswith("labels/clusters/0/c/") for k in tree_a)
    assert tree_a == tree_b, sorted(
        k for k in tree_a.keys() | tree_b.keys() if tree_a.get(k) != tree_b.get(k)
    )
    assert (
        Path(got["outputs"]["overlay_png"]).read_bytes() == Path(want["outputs"]["overlay_png"]).read_bytes()
    )
    assert _polygons(got["outputs"]["geojson"]) == _polygons(want["outputs"]["geojson"])
    assert Path(got["outputs"]["geojson"]).read_bytes() == Path(want["outputs"]["geojson"]).read_bytes()
    props = [
        (f["id"], f["properties"])
        for f in json.loads(Path(got["outputs"]["geojson"]).read_text())["features"]
    ]
    ref = [
        (f["id"], f["properties"])
        for f in json.loads(Path(want["outputs"]["geojson"]).read_text())["features"]
    ]
    assert props == ref


# A library function (not one of this module) so that forkserver children unpickle it.
_SEGMENT = functools.partial(segment.segment_store_ranges, layer=SPEC.layer, spec=CLUSTER, band_rows=BAND)


def _share(args: tuple) -> dict:
    store, out, ranges = args
    return _SEGMENT(store, out, ranges=ranges)


def test_ranges_in_two_processes_give_the_single_process_outputs(large):
    """Ranges spread over two processes (interleaved, so both write the array at once, and each fits
    or loads the per-sample model): exactly one share publishes, the outputs equal segment_store's, the
    partial is gone, and a rerun skips."""
    from ome_zarr_models import open_ome_zarr

    store, out = large["store"], large["root"] / "two"
    ranges = segment.segment_ranges(store)
    assert len(ranges) >= 16 and ranges[-1][1] == large["n"]
    shares = [(str(store), str(out), ranges[0::2]), (str(store), str(out), ranges[1::2])]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        results = [f.result() for f in [pool.submit(_SEGMENT, a, b, ranges=c) for a, b, c in shares]]
    assert sum(r["tiles_done"] for r in results) == large["n"]
    published = [r for r in results if r["status"] == "written" and "outputs" in r]
    assert any(r["published"] for r in results) and len(published) >= 1
    done = next(r for r in results if "outputs" in r)
    _same_outputs(done, large["reference"])
    path = Path(done["outputs"]["ome_zarr"])
    assert open_ome_zarr(zarr.open_group(path, mode="r")).ome_zarr_version == "0.5"
    assert not (out / ("large" + PARTIAL_SUFFIX)).exists()
    marker = json.loads((out / "large.segment.json").read_text())
    ref_marker = json.loads((large["root"] / "reference" / "large.segment.json").read_text())
    assert marker == ref_marker

    again = _share((str(store), str(out), None))
    assert again["status"] == "skipped" and again["published"] and again["tiles_done"] == 0


def test_a_rerun_after_a_kill_computes_only_the_missing_ranges(large):
    """A share of the ranges runs (as a killed worker leaves them), then a child segmenting the rest
    is SIGKILLed while it publishes: the rerun computes no range twice, and the outputs equal
    segment_store's."""
    from equislide.storage import read_features_meta
    from equislide.storage.label_ranges import open_label_ranges

    store, out = large["store"], large["root"] / "killed"
    ranges = segment.segment_ranges(store)
    first = _share((str(store), str(out), ranges[: len(ranges) // 3]))
    assert not first["published"] and first["tiles_done"] == ranges[len(ranges) // 3 - 1][1]
    partial = out / ("large" + PARTIAL_SUFFIX)
    before = sorted(p.name for p in (partial / "done").iterdir())
    assert len(before) == len(ranges) // 3

    # The rest in a child, killed once every range is done: while it stitches and writes outputs.
    child = multiprocessing.get_context("forkserver").Process(target=_SEGMENT, args=(str(store), str(out)))
    child.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((partial / "done").glob("*.json"))) < len(ranges):
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert not (out / "large.segment.json").exists(), "the kill came too late to test a resume"
    done_now = {tuple(map(int, p.stem.split("-"))) for p in (partial / "done").glob("*.json")}

    res = _share((str(store), str(out), None))
    redone = {(r["start"], r["stop"]) for r in res["ranges"] if r["status"] == "written"}
    assert redone == set(ranges) - done_now and res["published"]
    _same_outputs(res, large["reference"])

    # A partial left by a run of another key (other features, another model) is discarded.
    f_tile = int(read_features_meta(store, SPEC.layer)["f_tile"])
    stale = open_label_ranges(partial, n_tiles=large["n"], f_tile=f_tile, shard_tiles=4, key="other")
    stale.mark_done(0, large["n"])
    (out / "large.segment.json").unlink()
    res = _share((str(store), str(out), None))
    assert res["tiles_done"] == large["n"] and res["published"]
    _same_outputs(res, large["reference"])


def test_geojson_of_a_zarr_map_traced_from_disk_equals_the_in_memory_one(tmp_path):
    """Random label maps with holes, corner contacts and one-pixel shapes, as numpy and as zarr arrays
    of bands of 1-64 rows (copied band by band into the file GDAL's polygonizer reads): the same
    collection, byte for byte, every geometry valid."""
    from scipy import ndimage

    from equislide.storage import labels_to_geojson

    for seed, band in [(0, 7), (1, 1), (2, 64), (3, 13)]:
        rng = np.random.default_rng(seed)
        noise = ndimage.gaussian_filter(rng.random((150, 130)), 1.5 + seed)
        labels = np.digitize(noise, np.quantile(noise, [0.25, 0.5, 0.8])).astype(np.uint8)
        labels[rng.random(labels.shape) < 0.02] = 0  # single no-tissue pixels: holes, corner contacts
        lazy = zarr.create_array(
            tmp_path / f"m{seed}.zarr", shape=labels.shape, chunks=(band, band), dtype=np.uint8
        )
        lazy[:] = labels
        kwargs = {"stride": 4, "l0_per_l": (2.0, 2.0), "l0_offset": (10.0, 20.0), "sample_id": "s"}
        whole, lazily = labels_to_geojson(labels, **kwargs), labels_to_geojson(lazy, **kwargs)
        assert len(whole["features"]) == 3 and json.dumps(whole) == json.dumps(lazily), (seed, band)
        for feature in lazily["features"]:
            geometry = shape(feature["geometry"])
            assert shapely.is_valid(geometry), shapely.is_valid_reason(geometry)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"m{i}.zarr" for i in range(seed + 1))


def test_stitched_bands_equal_stitch_store(large, tmp_path):
    """The band stitcher's maps equal stitch_store's, for bands of 1 row up to the whole map."""
    from equislide.storage import read_features_meta, stitch_store
    from equislide.storage.label_ranges import stitch_label_map

    store = large["store"]
    fmeta = read_features_meta(store, SPEC.layer)
    f, stride = int(fmeta["f_tile"]), int(fmeta["stride"])
    rng = np.random.default_rng(0)
    tile_labels = rng.integers(0, 5, (large["n"], f, f)).astype(np.uint16)
    want = stitch_store(store, tile_labels, stride=stride, image=False)
    values, counts = np.unique(want["labels"], return_counts=True)
    for band in (1, 37, 4096):
        group = zarr.open_group(tmp_path / f"b{band}.zarr", mode="w")
        arr = group.create_array("tile_labels", shape=tile_labels.shape, chunks=(4, f, f), dtype=np.uint16)
        arr[:] = tile_labels
        got = stitch_label_map(store, arr, group, stride=stride, band_rows=band)
        np.testing.assert_array_equal(got["labels"][:], want["labels"])
        np.testing.assert_array_equal(got["tissue"][:], want["tissue"])
        assert got["labels"].dtype == want["labels"].dtype
        assert got["label_counts"] == dict(zip(values.tolist(), counts.tolist(), strict=True))
        assert got["values"]["tissue"] == np.unique(want["tissue"]).tolist()
        assert (got["l_origin"], got["l0_origin"]) == (want["l_origin"], want["l0_origin"])


def test_kept_pictures_are_used_and_give_the_same_outputs(large, tmp_path):
    """The pictures the features stage keeps in the store (``prepare_pictures``: the overlay's and the
    OME-Zarr image levels) are what the outputs are made from (doctored copies show through), the
    outputs equal segment_store's drawn from scratch, and pictures whose key no longer holds (the
    store tiled again) are drawn anew."""
    import shutil

    from equislide.storage import read_sample_meta

    store = tmp_path / "tiles" / large["store"].name
    shutil.copytree(large["store"], store)
    meta = read_sample_meta(store)
    assert segment.prepare_pictures(store)["status"] == "written"
    assert segment.prepare_pictures(store)["status"] == "skipped"
    kept = zarr.open_array(store / segment.PICTURE_ARRAY, mode="r+")
    drawn = segment._draw_overlay_picture(store, meta)
    assert np.array_equal(kept[...], drawn[0]) and kept.attrs["equislide"]["down"] == drawn[2]
    assert segment._kept_image_levels(store) == store / segment.IMAGE_LEVELS
    got = segment.segment_store_ranges(
        store, tmp_path / "out", layer=SPEC.layer, spec=CLUSTER, band_rows=BAND
    )
    _same_outputs(got, large["reference"])

    original = kept[...]
    kept[...] = 7
    assert (segment.overlay_picture(store, meta)[0] == 7).all()  # the kept picture, not a new drawing
    level0 = zarr.open_array(store / segment.IMAGE_LEVELS / "0", mode="r+")
    level0[...] = 9
    redone = segment.segment_store(store, tmp_path / "doctored", layer=SPEC.layer, spec=CLUSTER)
    assert (zarr.open_array(Path(redone["outputs"]["ome_zarr"]) / "0", mode="r")[...] == 9).all()

    kept.update_attributes({"equislide": {**kept.attrs["equislide"], "key": "another store"}})
    assert np.array_equal(segment.overlay_picture(store, meta)[0], original)
    levels = zarr.open_group(store / segment.IMAGE_LEVELS, mode="r+")
    levels.update_attributes({"equislide": {"key": "another store"}})
    assert segment._kept_image_levels(store) is None
    assert segment.prepare_pictures(store)["status"] == "written"
    assert np.array_equal(zarr.open_array(store / segment.PICTURE_ARRAY, mode="r")[...], original)
    again = segment.segment_store(store, tmp_path / "again", layer=SPEC.layer, spec=CLUSTER)
    _same_outputs(again, large["reference"])

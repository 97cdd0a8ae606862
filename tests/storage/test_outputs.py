"""Sample outputs: stitched label maps, OME-Zarr (NGFF 0.5 and 0.4), QuPath GeoJSON, overlay PNG, run.json."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import zarr
from PIL import Image

from equislide.storage import (
    NGFF_VERSION,
    NO_TISSUE,
    PALETTE,
    RunManifest,
    describe_inputs,
    label_color,
    labels_to_geojson,
    ngff_attrs,
    read_manifest,
    render_overlay,
    sha256_file,
    stitch_image,
    stitch_labels,
    stitch_store,
    validate_image_attrs,
    validate_label_attrs,
    write_geojson,
    write_manifest,
    write_ome_zarr,
    write_overlay_png,
)
from equislide.storage.geojson import ring_area

# ---------------------------------------------------------------- stitching


def test_stitch_labels_places_tiles_fills_gaps_and_masks():
    stride, f = 4, 3  # tiles of 12 analysis px -> 3 x 3 label px
    tiles = np.stack([np.full((f, f), k) for k in (0, 1, 2)])
    tiles[2, 0, 0] = -1  # "no tissue" inside a tile
    coords = np.array([[0, 0], [12, 0], [12, 12]])  # (l_x, l_y); tile (0, 12) is missing
    out = stitch_labels(tiles, coords, stride=stride)
    assert out.shape == (6, 6) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:3, :3], 1)
    np.testing.assert_array_equal(out[:3, 3:], 2)
    np.testing.assert_array_equal(out[3:, :3], NO_TISSUE)  # no tile there
    assert out[3, 3] == NO_TISSUE and (out[3:, 3:].ravel()[1:] == 3).all()

    mask = np.ones((3, 3), np.uint8)  # 8 analysis px per mask px over 24 x 24 px
    mask[0, 2] = 0  # analysis x in [16, 24), y in [0, 8): label cols 4, 5 (centres 18, 22), rows 0, 1
    masked = stitch_labels(tiles, coords, stride=stride, tissue_mask=mask, mask_downsample=8)
    np.testing.assert_array_equal(masked[:2, 4:], NO_TISSUE)
    np.testing.assert_array_equal(masked[:2, 3], 2)
    np.testing.assert_array_equal(masked[2:, 4:], out[2:, 4:])

    big = stitch_labels(np.full((1, 2, 2), 300), np.array([[0, 0]]), stride=1, shape=(3, 3))
    assert big.dtype == np.uint16 and big[0, 0] == 301 and big[2, 2] == 0
    with pytest.raises(ValueError, match="multiple of stride=4"):
        stitch_labels(tiles, coords + 1, stride=stride)


def test_stitch_image_crops_halo_and_downsamples():
    halo, tile = 2, 8
    tiles = np.zeros((2, tile + 2 * halo, tile + 2 * halo, 3), np.uint8)
    tiles[:, :halo] = 255  # halo rows must not show up
    tiles[0, halo:-halo, halo:-halo] = 100
    tiles[1, halo:-halo, halo:-halo] = 50
    tiles[1, halo : halo + 2, halo : halo + 2] = 250  # one 2 x 2 block of the second tile
    img = stitch_image(tiles, np.array([[0, 0], [8, 0]]), halo=halo, downsample=2)
    assert img.shape == (4, 8, 3) and img.dtype == np.uint8
    assert (img[:, :4] == 100).all()
    assert (img[0, 4] == 250).all() and (img[1:, 5:] == 50).all()


# ---------------------------------------------------------------- OME-Zarr


def _sample(h: int = 40, w: int = 60):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    clusters = np.zeros((h, w), np.uint8)
    clusters[5:20, 5:30] = 1
    clusters[20:35, 30:55] = 3
    tissue = (clusters > 0).astype(np.uint8)
    return image, clusters, tissue


def test_ome_zarr_layout_matches_ngff_04(tmp_path):
    image, clusters, tissue = _sample()
    path = write_ome_zarr(
        tmp_path / "B3.ome.zarr",
        image,
        pixel_size_um=8.0,
        labels={"clusters": clusters, "tissue": tissue},
        name="tma01/B3",
        min_side=16,
        ngff_version="0.4",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B3.ome.zarr"]  # no partial left
    assert (path / ".zgroup").is_file() and (path / ".zattrs").is_file()
    root = zarr.open_group(path, mode="r", zarr_format=2)
    ms = root.attrs["multiscales"]
    assert len(ms) == 1 and ms[0]["version"] == "0.4" and ms[0]["name"] == "tma01/B3"
    assert [(a["name"], a["type"]) for a in ms[0]["axes"]] == [
        ("c", "channel"),
        ("y", "space"),
        ("x", "space"),
    ]
    assert all(a["unit"] == "micrometer" for a in ms[0]["axes"][1:])
    shapes = [(3, 40, 60), (3, 20, 30), (3, 10, 15)]  # halved until the largest side <= 16
    assert [d["path"] for d in ms[0]["datasets"]] == ["0", "1", "2"]
    for i, d in enumerate(ms[0]["datasets"]):
        assert d["coordinateTransformations"] == [{"type": "scale", "scale": [1.0, 8.0 * 2**i, 8.0 * 2**i]}]
        assert root[d["path"]].shape == shapes[i] and root[d["path"]].dtype == np.uint8
    np.testing.assert_array_equal(root["0"][:], image.transpose(2, 0, 1))
    np.testing.assert_allclose(root["1"][:, 0, 0], image[:2, :2].reshape(-1, 3).mean(0), atol=0.51)
    zarray = json.loads((path / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["compressor"]["id"] == "blosc"
    assert [c["color"] for c in root.attrs["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]

    assert root["labels"].attrs["labels"] == ["clusters", "tissue"]
    lab = root["labels/clusters"]
    lms = lab.attrs["multiscales"][0]
    assert [a["name"] for a in lms["axes"]] == ["y", "x"] and len(lms["datasets"]) == 3
    for i, d in enumerate(lms["datasets"]):
        assert d["coordinateTransformations"][0]["scale"] == [8.0 * 2**i, 8.0 * 2**i]
        assert lab[d["path"]].shape == shapes[i][1:]
    np.testing.assert_array_equal(lab["0"][:], clusters)
    # Nearest: the label under each coarse pixel's centre (level 1: odd rows / cols, level 2: 2 mod 4).
    np.testing.assert_array_equal(lab["1"][:], clusters[1::2, 1::2])
    np.testing.assert_array_equal(lab["2"][:], clusters[2::4, 2::4])
    il = lab.attrs["image-label"]
    assert il["version"] == "0.4" and il["source"] == {"image": "../../"}
    colors = {c["label-value"]: c["rgba"] for c in il["colors"]}
    assert colors == {0: [0, 0, 0, 0], 1: [*PALETTE[1], 255], 3: [*PALETTE[3], 255]}
    names = {p["label-value"]: p["name"] for p in il["properties"]}
    assert names[0] == "no tissue"
    tcolors = {c["label-value"]: c["rgba"] for c in root["labels/tissue"].attrs["image-label"]["colors"]}
    assert tcolors[0][3] == 0 and tcolors[1][3] == 255

    # Writing again replaces the store in place.
    write_ome_zarr(path, image[:20, :20], pixel_size_um=8.0, min_side=16, ngff_version="0.4")
    again = zarr.open_group(path, mode="r", zarr_format=2)
    assert again["0"].shape == (3, 20, 20) and "labels" not in again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B3.ome.zarr"]


def test_ome_zarr_validation_names_the_field(tmp_path):
    image, clusters, _ = _sample()
    write_ome_zarr(
        tmp_path / "a.ome.zarr",
        image,
        pixel_size_um=1.0,
        labels={"clusters": clusters},
        min_side=16,
        ngff_version="0.4",
    )
    root = zarr.open_group(tmp_path / "a.ome.zarr", mode="r", zarr_format=2)
    good = dict(root.attrs)
    validate_image_attrs(good)
    bad = json.loads(json.dumps(good))
    del bad["multiscales"][0]["axes"][1]["unit"]
    with pytest.raises(ValueError, match=r"multiscales\[0\]\.axes\[1\]\.unit"):
        validate_image_attrs(bad)
    bad = json.loads(json.dumps(good))
    bad["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"datasets\[1\]\.coordinateTransformations\[0\]\.scale"):
        validate_image_attrs(bad)
    bad = json.loads(json.dumps(good))
    bad["multiscales"][0]["version"] = "0.5"
    with pytest.raises(ValueError, match=r"multiscales\[0\]\.version"):
        validate_image_attrs(bad)
    bad = json.loads(json.dumps(good))
    bad["multiscales"][0]["datasets"][0]["coordinateTransformations"].append(
        {"type": "translation", "translation": [0.0, 1.0]}
    )
    with pytest.raises(ValueError, match=r"datasets\[0\]\.coordinateTransformations\[1\]\.translation"):
        validate_image_attrs(bad)
    with pytest.raises(ValueError, match=r"ome\.version"):
        validate_image_attrs({"ome": {"version": "0.4", "multiscales": good["multiscales"]}})
    with pytest.raises(ValueError, match=r"ome\.multiscales\[0\]\.axes\[1\]\.unit"):
        bad = json.loads(json.dumps(good["multiscales"]))
        del bad[0]["axes"][1]["unit"]
        validate_image_attrs({"ome": {"version": "0.5", "multiscales": bad}})

    label = json.loads(json.dumps(dict(root["labels/clusters"].attrs)))
    validate_label_attrs(label, n_levels=len(good["multiscales"][0]["datasets"]))
    with pytest.raises(ValueError, match="must have 9 levels"):
        validate_label_attrs(label, n_levels=9)
    label["image-label"]["colors"][1]["rgba"] = [1, 2, 3]
    with pytest.raises(ValueError, match=r"image-label\.colors\[1\]\.rgba"):
        validate_label_attrs(label)

    with pytest.raises(ValueError, match="labels\\['clusters'\\] must be"):
        write_ome_zarr(tmp_path / "b.ome.zarr", image, pixel_size_um=1.0, labels={"clusters": clusters[:-1]})
    with pytest.raises(ValueError, match="labels\\['clusters'\\] must be"):  # coarse map short of the image
        write_ome_zarr(
            tmp_path / "b.ome.zarr",
            image,
            pixel_size_um=1.0,
            labels={"clusters": clusters[:4, :8]},
            label_upsample=8,
        )
    with pytest.raises(ValueError, match="uint8"):
        write_ome_zarr(tmp_path / "b.ome.zarr", image.astype(np.float32), pixel_size_um=1.0)
    with pytest.raises(ValueError, match="ngff_version"):
        write_ome_zarr(tmp_path / "b.ome.zarr", image, pixel_size_um=1.0, ngff_version="0.3")
    assert not (tmp_path / "b.ome.zarr").exists()


def test_ome_zarr_layout_matches_ngff_05(tmp_path):
    image, clusters, tissue = _sample()
    path = write_ome_zarr(
        tmp_path / "B3.ome.zarr",
        image,
        pixel_size_um=8.0,
        labels={"clusters": clusters, "tissue": tissue},
        name="tma01/B3",
        min_side=16,
        translation_um=(800.0, 1600.0),
        attributes={"l0_origin": [400.0, 800.0]},
    )
    assert NGFF_VERSION == "0.5"
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    assert meta["attributes"]["equislide"] == {"l0_origin": [400.0, 800.0]}
    for i, d in enumerate(ome["multiscales"][0]["datasets"]):
        scale, shift = d["coordinateTransformations"]
        assert scale["scale"] == [1.0, 8.0 * 2**i, 8.0 * 2**i]
        # Level i's first pixel centre sits at the centre of level 0's first 2**i x 2**i block.
        assert shift["translation"] == [0.0, 1600.0 + (2**i - 1) * 4.0, 800.0 + (2**i - 1) * 4.0]
    array = json.loads((path / "0" / "zarr.json").read_text())
    assert array["dimension_names"] == ["c", "y", "x"] and array["shape"] == [3, 40, 60]
    assert "zstd" in json.dumps(array["codecs"])
    root = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(root["0"][:], image.transpose(2, 0, 1))
    labels_meta = json.loads((path / "labels" / "zarr.json").read_text())["attributes"]
    assert labels_meta == {"ome": {"version": "0.5", "labels": ["clusters", "tissue"]}}
    lab = ngff_attrs(root["labels/clusters"].attrs)
    assert lab["image-label"]["source"] == {"image": "../../"} and "version" not in lab["image-label"]
    assert json.loads((path / "labels/clusters/0/zarr.json").read_text())["dimension_names"] == ["y", "x"]
    np.testing.assert_array_equal(root["labels/clusters/1"][:], clusters[1::2, 1::2])


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_ome_zarr_validates_with_ome_zarr_models_and_reads_with_ome_zarr_py(tmp_path, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    image, clusters, tissue = _sample()
    coarse = clusters[::4, ::4]  # a label map 4 x coarser, its grid starting 2 px before the image
    path = write_ome_zarr(
        tmp_path / "s.ome.zarr",
        image[2:, 2:],
        pixel_size_um=2.0,
        labels={"clusters": coarse, "tissue": tissue[::4, ::4]},
        label_upsample=4,
        label_offset=(2, 2),
        translation_um=(10.0, 20.0),
        min_side=8,
        ngff_version=version,
    )
    # ome-zarr-models checks the whole hierarchy: the image, its arrays, labels/ and each label image.
    model = open_ome_zarr(zarr.open_group(path, mode="r"))
    assert type(model).__name__ == "Image" and model.ome_zarr_version == version
    label_model = open_ome_zarr(zarr.open_group(path / "labels" / "clusters", mode="r"))
    assert type(label_model).__name__ == "ImageLabel"
    attrs = label_model.attributes.ome if version == "0.5" else label_model.attributes
    assert {c.label_value for c in attrs.image_label.colors} == {0, 1, 3}

    nodes = {str(n.zarr).split(" ")[0].rsplit("/", 1)[-1]: n for n in Reader(parse_url(str(path)))()}
    data = nodes["s.ome.zarr"].data
    assert [d.shape for d in data] == [(3, 38, 58), (3, 19, 29), (3, 10, 15), (3, 5, 8)]
    np.testing.assert_array_equal(np.asarray(data[0]), image[2:, 2:].transpose(2, 0, 1))
    level0 = nodes["s.ome.zarr"].metadata["coordinateTransformations"][0]
    assert level0 == [
        {"type": "scale", "scale": [1.0, 2.0, 2.0]},
        {"type": "translation", "translation": [0.0, 20.0, 10.0]},
    ]
    for name, source in (("clusters", coarse), ("tissue", tissue[::4, ::4])):
        assert "Label" in {type(s).__name__ for s in nodes[name].specs}
        levels = nodes[name].data
        assert [d.shape for d in levels] == [d.shape[1:] for d in data]
        for n, level in enumerate(levels):
            # Independent of the writer: the label map's pixel under each level-n pixel's centre.
            centre_y = 2 + (np.arange(level.shape[0]) + 0.5) * 2**n
            centre_x = 2 + (np.arange(level.shape[1]) + 0.5) * 2**n
            rows = np.minimum(np.floor(centre_y / 4).astype(int), source.shape[0] - 1)
            cols = np.minimum(np.floor(centre_x / 4).astype(int), source.shape[1] - 1)
            np.testing.assert_array_equal(np.asarray(level), source[rows][:, cols], err_msg=f"{name} {n}")


def _tile_store(tmp_path, *, origin, grid=(3, 2), tile=16, halo=4, dims=None, l0_per_l=2.0, source=None):
    """A finished tile store with distinct random tiles (halos included) on a grid at ``origin``."""
    from equislide.storage import open_sample_for_write

    rng = np.random.default_rng(1)
    rows, cols = grid
    coords = np.array(
        [[origin[0] + c * tile, origin[1] + r * tile] for r in range(rows) for c in range(cols)]
    )
    tiles = rng.integers(0, 256, (len(coords), tile + 2 * halo, tile + 2 * halo, 3), dtype=np.uint8)
    attrs = {
        "mpp": 2.0,
        "source_mpp": 2.0 / l0_per_l,
        "l0_per_l": [l0_per_l, l0_per_l],
        "grid_shape": list(grid),
    }
    if dims is not None:
        attrs["source_dimensions"] = list(dims)
    if source is not None:
        attrs["source_path"] = str(source)
    n = len(coords)
    with open_sample_for_write(tmp_path, "s", n_tiles=n, tile=tile, halo=halo, attrs=attrs) as w:
        w.write_tiles(0, tiles, coords)
    return tmp_path / "s.zarr", tiles, coords


def _naive_plane(tiles, coords, halo, rect):
    """The analysis plane over ``rect`` by pasting every interior into one canvas (white elsewhere)."""
    x0, y0, x1, y1 = rect
    side = tiles.shape[1] - 2 * halo
    lo = np.minimum(coords.min(0), [x0, y0])
    hi = np.maximum(coords.max(0) + side, [x1, y1])
    canvas = np.full((hi[1] - lo[1], hi[0] - lo[0], 3), 255, np.uint8)
    for t, (x, y) in zip(tiles, coords - lo, strict=True):
        canvas[y : y + side, x : x + side] = t[halo : halo + side, halo : halo + side]
    return canvas[y0 - lo[1] : y1 - lo[1], x0 - lo[0] : x1 - lo[0]]


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_sample_ome_zarr_is_the_tile_stores_analysis_plane_with_labels_on_it(tmp_path, version):
    """The stage's writer: a core-like sample away from the slide's origin, a grid that runs past the
    slide's right edge (cut there), labels at stride 4 sampled onto every level, translation and
    level-0 offset placing it on the slide; pixels equal the tiles' interiors, read back with
    ome-zarr-py, hierarchy valid for ome-zarr-models."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    from equislide.stages.segment import write_sample_ome_zarr

    stride, halo = 4, 4
    # Slide 74 x 90 analysis px (148 x 180 level-0 px); grid x in [40, 72) fits, rows [12, 60) fit.
    store, tiles, coords = _tile_store(tmp_path, origin=(40, 12), dims=(140, 180))
    rng = np.random.default_rng(2)
    tile_labels = rng.integers(0, 3, (len(coords), 4, 4))
    stitched = stitch_store(store, tile_labels, stride=stride, image=False)
    meta = {"sample_id": "s", "mpp": 2.0, "kind": "tma_core", "source_dimensions": [140, 180]}
    path = write_sample_ome_zarr(
        tmp_path / "s.ome.zarr",
        store,
        meta,
        stitched,
        stride=stride,
        names={1: "a"},
        ngff_version=version,
        min_side=8,
        chunk=8,  # several bands per level
    )
    assert open_ome_zarr(zarr.open_group(path, mode="r")).ome_zarr_version == version
    root = zarr.open_group(path, mode="r")
    # The slide ends at x = 70 (140 / 2 level-0 px per analysis px): the grid's last 2 columns are cut.
    rect = (40, 12, 70, 60)
    expect = _naive_plane(tiles, coords, halo, rect)
    nodes = {str(n.zarr).split(" ")[0].rsplit("/", 1)[-1]: n for n in Reader(parse_url(str(path)))()}
    image = nodes["s.ome.zarr"].data
    np.testing.assert_array_equal(np.asarray(image[0]).transpose(1, 2, 0), expect)
    assert image[0].shape == (3, 48, 30) and image[1].shape == (3, 24, 15)
    top_left = expect[:2, :2].reshape(-1, 3).astype(float).mean(0)
    np.testing.assert_allclose(np.asarray(image[1])[:, 0, 0], top_left, atol=0.51)
    shift = nodes["s.ome.zarr"].metadata["coordinateTransformations"][0][1]["translation"]
    assert shift == [0.0, 12 * 2.0, 40 * 2.0]  # µm: analysis px x 2 µm
    extra = root.attrs["equislide"]
    assert extra["l_origin"] == [40, 12] and extra["l0_origin"] == [80.0, 24.0]
    assert extra["label_grid"] == {"stride": 4, "l_origin": [40, 12]}
    labels = stitched["labels"]
    for n, level in enumerate(nodes["clusters"].data):
        centre_y = (np.arange(level.shape[0]) + 0.5) * 2**n
        centre_x = (np.arange(level.shape[1]) + 0.5) * 2**n
        rows = np.minimum((centre_y // stride).astype(int), labels.shape[0] - 1)
        cols = np.minimum((centre_x // stride).astype(int), labels.shape[1] - 1)
        np.testing.assert_array_equal(np.asarray(level), labels[rows][:, cols], err_msg=f"level {n}")
        assert level.shape == image[n].shape[1:]


def test_tile_plane_streams_bands_and_cuts_to_the_slide(tmp_path):
    """A band reads only the tiles it meets (memory stays one tile row), the plane equals the naive
    stitch, and a grid centred on the tissue that starts before the slide is cut at 0."""
    from equislide.storage import downsample_plane, tile_plane

    # Grid x in [-6, 26), y in [-10, 38); the slide is 40 x 50 analysis px (80 x 100 level-0 px).
    store, tiles, coords = _tile_store(tmp_path, origin=(-6, -10), grid=(3, 2), dims=(80, 100))
    plane = tile_plane(store)
    assert plane.l_origin == (0, 0) and plane.shape == (38, 26, 3)
    full = _naive_plane(tiles, coords, 4, (0, 0, 26, 38))
    seen = []
    for y0 in range(0, plane.shape[0], 5):
        np.testing.assert_array_equal(plane[y0 : y0 + 5], full[y0 : y0 + 5])
        seen.append(len(plane._cache))
    assert max(seen) <= 2 * 2  # a band meets at most two tile rows of two
    np.testing.assert_array_equal(plane[3:9, 4:7], full[3:9, 4:7])
    whole = tile_plane(store, extent="slide")
    assert whole.l_origin == (0, 0) and whole.shape == (50, 40, 3)
    rgb, covered = downsample_plane(whole, 2, band_rows=3)
    assert rgb.shape == (25, 20, 3) and covered[:19, :13].all()
    assert not covered[19:].any() and not covered[:, 13:].any()
    expect = _naive_plane(tiles, coords, 4, (0, 0, 40, 50)).astype(float)
    np.testing.assert_allclose(rgb[5, 5], expect[10:12, 10:12].reshape(-1, 3).mean(0), atol=0.51)


# ---------------------------------------------------------------- GeoJSON


def _shapes() -> np.ndarray:
    lab = np.zeros((80, 80), np.uint8)
    lab[10:30, 10:30] = 1  # square, 400 px
    yy, xx = np.mgrid[:80, :80]
    lab[(yy - 55) ** 2 + (xx - 25) ** 2 <= 12**2] = 2  # disc, radius 12
    lab[40:70, 45:75] = 3  # square with a hole
    lab[50:60, 55:65] = 0
    return lab


def test_geojson_polygons_areas_scale_offset_and_orientation(tmp_path):
    lab = _shapes()
    stride, l0_per_l, off = 4, 2.0, (1000.0, 500.0)
    fc = labels_to_geojson(lab, stride=stride, l0_per_l=l0_per_l, l0_offset=off, simplify=0.0)
    path = write_geojson(tmp_path / "out" / "B3.geojson", fc)
    loaded = json.loads(path.read_text())
    assert loaded["type"] == "FeatureCollection" and len(loaded["features"]) == 3
    px_area = (stride * l0_per_l) ** 2
    for feat in loaded["features"]:
        v = feat["properties"]["label_value"]
        assert feat["properties"]["objectType"] == "annotation"
        assert feat["properties"]["classification"] == {"name": f"cluster {v}", "color": list(PALETTE[v])}
        assert feat["geometry"]["type"] == "MultiPolygon"
        polys = feat["geometry"]["coordinates"]
        assert len(polys) == 1
        area = 0.0
        for k, ring in enumerate(polys[0]):
            assert ring[0] == ring[-1] and len(ring) >= 4  # closed
            a = ring_area(ring)
            assert (a > 0) if k == 0 else (a < 0)  # exterior CCW, holes CW
            area += a
        want = float((lab == v).sum()) * px_area
        assert area == pytest.approx(want, rel=1e-9), (v, area, want)  # rings follow pixel edges exactly
    light = labels_to_geojson(lab, stride=stride, l0_per_l=l0_per_l, l0_offset=off)  # default simplify
    for feat in light["features"]:
        want = float((lab == feat["properties"]["label_value"]).sum()) * px_area
        area = sum(ring_area(r) for r in feat["geometry"]["coordinates"][0])
        assert abs(area - want) / want < 0.02
    square = loaded["features"][0]["geometry"]["coordinates"][0][0]
    xs, ys = [p[0] for p in square], [p[1] for p in square]
    assert (min(xs), max(xs)) == (1000 + 10 * 8, 1000 + 30 * 8)
    assert (min(ys), max(ys)) == (500 + 10 * 8, 500 + 30 * 8)
    holed = loaded["features"][2]["geometry"]["coordinates"][0]
    assert len(holed) == 2
    hx = [p[0] for p in holed[1]]
    assert (min(hx), max(hx)) == (1000 + 55 * 8, 1000 + 65 * 8)


def test_geojson_simplification_and_separate_components():
    lab = np.zeros((30, 30), np.int16)
    yy, xx = np.mgrid[:30, :30]
    lab[(yy - 14) ** 2 + (xx - 14) ** 2 <= 10**2] = 1
    lab[0:3, 25:29] = 1  # a second component of the same cluster
    raw = labels_to_geojson(lab, stride=1, l0_per_l=1.0, simplify=0.0)
    simple = labels_to_geojson(lab, stride=1, l0_per_l=1.0, simplify=0.5)
    polys_raw = raw["features"][0]["geometry"]["coordinates"]
    polys_simple = simple["features"][0]["geometry"]["coordinates"]
    assert len(polys_raw) == len(polys_simple) == 2
    disc_raw, disc_simple = (max(polys, key=lambda p: ring_area(p[0])) for polys in (polys_raw, polys_simple))
    assert len(disc_simple[0]) < len(disc_raw[0])
    a_raw = sum(ring_area(p[0]) for p in polys_raw)
    a_simple = sum(ring_area(p[0]) for p in polys_simple)
    assert abs(a_simple - a_raw) / a_raw < 0.03
    assert labels_to_geojson(np.zeros((4, 4), np.uint8), stride=1, l0_per_l=1.0)["features"] == []
    with pytest.raises(ValueError, match="must be > 0"):
        labels_to_geojson(lab, stride=0, l0_per_l=1.0)


# ---------------------------------------------------------------- overlay


def test_overlay_blends_palette_colours_and_adds_a_legend(tmp_path):
    image = np.full((40, 60, 3), 200, np.uint8)
    lab = np.zeros((10, 15), np.uint8)
    lab[:5, :5] = 1
    lab[5:, 10:] = 2
    bare = np.asarray(render_overlay(image, lab, alpha=0.5, legend=False))
    assert bare.shape == (40, 60, 3)
    np.testing.assert_array_equal(
        bare[2, 2], np.rint(0.5 * 200 + 0.5 * np.array(PALETTE[1])).astype(np.uint8)
    )
    np.testing.assert_array_equal(
        bare[38, 58], np.rint(0.5 * 200 + 0.5 * np.array(PALETTE[2])).astype(np.uint8)
    )
    np.testing.assert_array_equal(bare[30, 10], [200, 200, 200])  # no tissue: unpainted
    pic = render_overlay(image, lab, alpha=0.5, title="tma01/B3")
    arr = np.asarray(pic)
    assert pic.mode == "RGB" and pic.size[0] >= 60 and pic.size[1] > 40
    # The blended picture sits whole in the canvas, under the title.
    at = [y for y in range(arr.shape[0] - 39) if (arr[y : y + 40, :60] == bare).all()]
    assert len(at) == 1 and at[0] > 0
    rest = arr.copy()
    rest[at[0] : at[0] + 40, :60] = 255
    for v in (1, 2):  # swatches in the legend
        assert (rest.reshape(-1, 3) == np.array(PALETTE[v])).all(axis=1).any()
    path = write_overlay_png(tmp_path / "B3.png", image, lab, legend=False)
    with Image.open(path) as back:
        assert back.format == "PNG" and back.size == (60, 40)
    assert label_color(300) == PALETTE[1 + (299 % 255)]
    with pytest.raises(ValueError, match="alpha"):
        render_overlay(image, lab, alpha=2.0)
    with pytest.raises(ValueError, match="pixel_size_um"):
        render_overlay(image, lab, pixel_size_um=0.0)


def test_overlay_labels_are_placed_by_origin_and_scale():
    image = np.full((20, 30, 3), 100, np.uint8)
    lab = np.array([[1, 2], [3, 0]], np.uint8)  # 8 image px per label px, corner at (4, -2)
    arr = np.asarray(render_overlay(image, lab, alpha=1.0, legend=False, label_origin=(4, -2), label_scale=8))
    assert (arr[:, :4] == 100).all() and (arr[:, 20:] == 100).all()  # left of / right of the map
    assert (arr[:6, 4:12] == PALETTE[1]).all() and (arr[:6, 12:20] == PALETTE[2]).all()
    assert (arr[6:14, 4:12] == PALETTE[3]).all() and (arr[6:14, 12:20] == 100).all()
    assert (arr[14:] == 100).all()  # below the map


@pytest.mark.parametrize("shape", [(1500, 2048), (2048, 900), (300, 300), (60, 40)])
def test_overlay_legend_is_readable_in_the_160px_thumbnail(tmp_path, shape):
    """The Prefect summary shows each overlay at 160 px (thumbnail_data_uri): the legend swatches
    must stay at least 8 px there, whatever the picture's size and orientation."""
    import base64

    from equislide.storage import thumbnail_data_uri

    h, w = shape
    image = np.full((h, w, 3), 128, np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    lab[:4, :4], lab[4:, :4], lab[:, 4:] = 1, 2, 3
    png = write_overlay_png(
        tmp_path / "o.png",
        image,
        lab,
        names={1: "stroma", 2: "tumour", 3: "fat"},
        title="slide-1",
        pixel_size_um=2.5,
    )
    with Image.open(png) as full:
        longest = max(full.size)
        assert longest <= max(h, w) * 1.6 or max(h, w) < 100  # the legend does not dwarf the picture
    uri = thumbnail_data_uri(png)
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
        small = np.asarray(thumb.convert("RGB")).astype(int)
    assert max(small.shape[:2]) == min(160, longest)  # thumbnails only shrink
    for v in (1, 2, 3):
        # Pure palette colour appears only in the swatches (the picture is blended over grey).
        near = np.abs(small - np.array(PALETTE[v])).max(axis=2) < 40
        ys, xs = np.nonzero(near)
        assert ys.size, f"swatch {v} not found"
        side = min(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        assert side >= 8, f"swatch {v} is {side} px in the 160 px thumbnail"


def test_scale_bar_is_a_round_length_in_um():
    from equislide.storage.overlay import scale_bar_length

    assert scale_bar_length(1110.0) == (200.0, "200 µm")
    assert scale_bar_length(30000.0) == (10000.0, "10 mm")
    assert scale_bar_length(4500.0) == (1000.0, "1 mm")
    assert scale_bar_length(7.5) == (2.0, "2 µm")
    with pytest.raises(ValueError, match="width_um"):
        scale_bar_length(0.0)
    image = np.full((400, 600, 3), 128, np.uint8)
    arr = np.asarray(render_overlay(image, np.zeros((4, 4), np.uint8), pixel_size_um=2.5))
    black = (arr == 0).all(axis=2)
    runs = [np.diff(np.flatnonzero(np.diff(np.r_[0, row, 0]))).max(initial=0) for row in black.astype(int)]
    # 600 px x 2.5 µm = 1500 µm wide: a 500 µm bar, 200 px, the only long black line.
    assert 200 <= max(runs) <= 201


def test_sample_overlay_covers_the_whole_slide(tmp_path):
    """A whole slide's overlay spans the slide, not the tile grid: the tiles where they are, the
    slide's own pixels (its thumbnail) past them; a slide that cannot be read leaves a warning."""
    from equislide.stages.segment import overlay_picture, write_sample_overlay
    from equislide.storage import read_sample_meta

    yy, xx = np.mgrid[0:100, 0:80]
    slide = np.stack([(xx * 3) % 256, (yy * 2) % 256, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    source = tmp_path / "slide.png"
    Image.fromarray(slide).save(source)
    # 2 level-0 px per analysis px: the slide is 40 x 50 analysis px, the 2 x 1 tiles cover x, y < 16, 32.
    store, tiles, coords = _tile_store(
        tmp_path, origin=(0, 0), grid=(2, 1), dims=(80, 100), source=source, l0_per_l=2.0
    )
    meta = read_sample_meta(store)
    rgb, l_origin, down, warning = overlay_picture(store, meta)
    assert warning is None and l_origin == (0, 0) and down == 1 and rgb.shape == (50, 40, 3)
    np.testing.assert_array_equal(rgb[:32, :16], _naive_plane(tiles, coords, 4, (0, 0, 16, 32)))
    blocks = slide.reshape(50, 2, 40, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(rgb[:, 16:], blocks[:, 16:], atol=1.01)  # right of the grid
    np.testing.assert_allclose(rgb[32:, :16], blocks[32:, :16], atol=1.01)  # below it
    stitched = stitch_store(store, np.ones((2, 4, 4), np.int64), stride=4, image=False)
    out = tmp_path / "s.png"
    assert write_sample_overlay(out, store, meta, stitched, stride=4, names={2: "b"}, title="s") is None
    with Image.open(out) as png:
        assert png.width >= 40 and png.height > 50

    source.unlink()
    rgb, _, _, warning = overlay_picture(store, meta)
    assert warning.startswith("overlay: slide not read") and "\n" not in warning
    assert (rgb[:, 16:] == 255).all()


# ---------------------------------------------------------------- run.json


def test_manifest_round_trip_atomic_and_schema_checked(tmp_path):
    slide = tmp_path / "slide.tiff"
    slide.write_bytes(b"not really a slide")
    man = RunManifest(parameters={"layer": 4, "k": 8}, inputs=describe_inputs([slide]), command=["equislide"])
    man.device = {"kind": "cpu", "workers": 1}
    man.set_sample("slide", "running")
    man.set_sample("slide", "done", timings={"features_s": 1.5}, outputs={"ome": "slide.ome.zarr"})
    man.set_sample("other", "failed", error="CorruptSlideError: bad tile")
    path = write_manifest(tmp_path, man)
    assert path == tmp_path / "run.json" and sorted(p.name for p in tmp_path.iterdir()) == [
        "run.json",
        "slide.tiff",
    ]
    doc = json.loads(path.read_text())
    assert doc["schema"] == "equislide-run" and doc["schema_version"] == 1
    assert list(doc)[:2] == ["schema", "schema_version"]
    assert doc["inputs"] == [{"path": str(slide), "sha256": sha256_file(slide), "size": 18}]
    assert {"python", "numpy", "zarr", "dask", "equislide"} <= doc["versions"].keys()
    assert list(doc["samples"]) == ["other", "slide"]
    assert doc["samples"]["slide"] == {
        "status": "done",
        "error": None,
        "timings": {"features_s": 1.5},
        "outputs": {"ome": "slide.ome.zarr"},
    }
    back = read_manifest(path)
    assert back.to_dict()["samples"] == doc["samples"] and back.run_id == man.run_id
    assert "stages" not in doc  # no per-stage figures: the key is left out
    man.stages = {"features": {"workers": {"tcp://a:1": {"tiles": 4, "seconds": 2.0, "tiles_per_s": 2.0}}}}
    assert read_manifest(write_manifest(tmp_path, man)).stages == man.stages

    with pytest.raises(ValueError, match="status='weird'"):
        man.set_sample("x", "weird")
    with pytest.raises(ValueError, match="not finite"):
        write_manifest(tmp_path / "bad.json", RunManifest(parameters={"x": float("nan")}))
    newer = dict(doc, schema_version=99)
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="schema_version=99"):
        read_manifest(tmp_path / "newer.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_manifest(tmp_path / "broken.json")


def test_manifest_versions_do_not_import_prefect():
    code = (
        "import sys; from equislide.storage import collect_versions; v = collect_versions(); "
        "assert 'prefect' in v, v; assert 'prefect' not in sys.modules; "
        "assert 'torch' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_palette_is_fixed_and_distinct():
    assert len(PALETTE) == 256 and PALETTE[0] == (0, 0, 0)
    assert len(set(PALETTE[1:21])) == 20
    assert all(all(0 <= c <= 255 for c in rgb) for rgb in PALETTE)


def test_stitch_store_chains_into_ome_geojson_and_overlay(tmp_path):
    from equislide.storage import open_sample_for_write

    tile, halo, stride = 16, 4, 4
    origin = np.array([100, 36])  # a TMA core's first tile, slide-wide analysis px
    coords = origin + np.array([[0, 0], [16, 0], [0, 16], [16, 16]])
    tiles = np.zeros((4, tile + 2 * halo, tile + 2 * halo, 3), np.uint8)
    for i in range(4):
        tiles[i] = 40 * (i + 1)
    mask = np.ones((4, 4), np.uint8)  # 8 analysis px per mask px, mask origin at (100, 36)
    mask[3, 3] = 0  # l_x in [124, 132), l_y in [60, 68): label pixels (6..7, 6..7)
    attrs = {
        "mpp": 2.0,
        "source_mpp": 0.5,
        "grid_shape": [2, 2],
        "l0_per_l": [4.0, 4.0],
        "tissue_mask_l_origin": [100.0, 36.0],
    }
    with open_sample_for_write(tmp_path, "tma01/A1", n_tiles=4, tile=tile, halo=halo, attrs=attrs) as w:
        w.write_tiles(0, tiles, coords)
        w.write_tissue_mask(mask, downsample=8)
    store = tmp_path / "tma01" / "A1.zarr"
    tile_labels = np.stack([np.full((4, 4), k) for k in (0, 1, 1, 2)])
    out = stitch_store(store, tile_labels, stride=stride)
    labels, image, tissue = out["labels"], out["image"], out["tissue"]
    assert labels.shape == (8, 8) and image.shape == (8, 8, 3) and tissue.shape == (8, 8)
    assert out["l_origin"] == (100, 36) and out["l0_origin"] == (400.0, 144.0)
    assert out["pixel_size_um"] == 8.0 and out["l0_per_l"] == (4.0, 4.0)
    np.testing.assert_array_equal(labels[:4, :4], 1)
    np.testing.assert_array_equal(labels[4:6, 4:6], 3)
    np.testing.assert_array_equal(labels[6:, 6:], NO_TISSUE)
    assert (image[:4, 4:] == 80).all() and (image[4:, 4:] == 160).all()
    assert tissue.sum() == 64 - 4 and tissue[7, 7] == 0

    ome = write_ome_zarr(
        tmp_path / "A1.ome.zarr",
        image,
        pixel_size_um=out["pixel_size_um"],
        labels={"clusters": labels, "tissue": tissue},
        min_side=4,
    )
    assert zarr.open_group(ome, mode="r")["labels/clusters/0"].shape == (8, 8)
    fc = labels_to_geojson(labels, stride=stride, l0_per_l=out["l0_per_l"], l0_offset=out["l0_origin"])
    first = fc["features"][0]["geometry"]["coordinates"][0][0]
    assert min(p[0] for p in first) == 400.0 and max(p[0] for p in first) == 400.0 + 16 * 4
    assert min(p[1] for p in first) == 144.0
    write_overlay_png(tmp_path / "A1.png", image, labels)


def test_overlay_image_is_finer_than_the_label_grid(tmp_path):
    """Overlays are drawn from the tiles at the finest power-of-two downsample that fits, not at the
    feature stride (a TMA core at layer 4 would be ~10 px); labels scale onto it by a whole factor."""
    import base64

    from PIL import Image

    from equislide.storage import open_sample_for_write, thumbnail_data_uri

    tile, halo, stride = 16, 4, 8
    coords = np.array([[0, 0], [16, 0], [0, 16], [16, 16]])
    tiles = np.zeros((4, tile + 2 * halo, tile + 2 * halo, 3), np.uint8)
    for i in range(4):
        tiles[i] = 40 * (i + 1)
    tiles[0, halo : halo + 2, halo : halo + 2] = 255  # a 2 px detail the label grid cannot show
    with open_sample_for_write(tmp_path, "s", n_tiles=4, tile=tile, halo=halo, attrs={"mpp": 2.0}) as w:
        w.write_tiles(0, tiles, coords)
    labels = np.ones((4, 2, 2), np.int64)
    store = tmp_path / "s.zarr"
    assert stitch_store(store, labels, stride=stride)["overlay_image"] is None
    full = stitch_store(store, labels, stride=stride, overlay_max=32)["overlay_image"]
    assert full.shape == (32, 32, 3)
    assert (full[:2, :2] == 255).all() and (full[2:16, 2:16] == 40).all() and (full[16:, 16:] == 160).all()
    half = stitch_store(store, labels, stride=stride, overlay_max=16)["overlay_image"]
    assert half.shape == (16, 16, 3) and (half[0, 0] == 255).all() and (half[8:, 8:] == 160).all()
    coarse = stitch_store(store, labels, stride=stride, overlay_max=2)
    np.testing.assert_array_equal(coarse["overlay_image"], coarse["image"])  # never coarser than labels

    png = write_overlay_png(tmp_path / "s.png", full, np.ones((4, 4), np.int64), legend=False)
    uri = thumbnail_data_uri(png, max_side=8)
    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 8


def test_real_slide_outputs_show_the_tissue_at_the_analysis_resolution(shared_data, tmp_path):
    """CMU-1-Small-Region (2220 x 2967 px at 0.499 µm/px) tiled with segment's defaults: the OME-Zarr
    image is the whole slide at 2.5 µm/px (444 x 593 px, not the 64 x 128 label grid), pixel for pixel
    the tile store's analysis plane; the overlay spans the slide with the slide's own pixels past the
    grid."""
    from ome_zarr_models import open_ome_zarr

    from equislide.stages.segment import overlay_picture, write_sample_ome_zarr
    from equislide.stages.tile import tile_slide
    from equislide.storage import read_sample_meta

    (res,) = tile_slide(shared_data / "slides" / "CMU-1-Small-Region.svs", tmp_path / "tiles")
    store = res.store
    meta = read_sample_meta(store)
    group = zarr.open_group(store, mode="r")
    tiles, coords, halo = group["tiles"][:], group["coords"][:], int(meta["halo"])
    stride = 8
    tile_labels = np.stack([np.full((64, 64), i % 3) for i in range(len(coords))])
    stitched = stitch_store(store, tile_labels, stride=stride, image=False)
    path = write_sample_ome_zarr(tmp_path / "s.ome.zarr", store, meta, stitched, stride=stride, names={})
    assert open_ome_zarr(zarr.open_group(path, mode="r")).ome_zarr_version == "0.5"
    root = zarr.open_group(path, mode="r")
    assert root["0"].shape == (3, 593, 444) and stitched["labels"].shape == (128, 64)
    np.testing.assert_array_equal(
        root["0"][:].transpose(1, 2, 0), _naive_plane(tiles, coords, halo, (0, 0, 444, 593))
    )
    gx, gy = stitched["l_origin"]  # the grid starts left of and above the slide
    lab0 = root["labels/clusters/0"][:]
    assert lab0.shape == (593, 444)
    rows, cols = (np.arange(593) - gy) // stride, (np.arange(444) - gx) // stride
    np.testing.assert_array_equal(lab0, stitched["labels"][rows][:, cols])

    rgb, l_origin, down, warning = overlay_picture(store, meta)
    assert warning is None and l_origin == (0, 0) and down == 1 and rgb.shape == (593, 444, 3)


def test_overlay_with_a_long_title_keeps_its_size() -> None:
    """A 180-character sample ID once grew the picture, then the font, until FreeType refused it."""
    from equislide.storage.overlay import render_overlay

    img = np.full((64, 64, 3), 200, np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    lab[2:5, 2:5] = 1
    short = render_overlay(img, lab, title="core A1", pixel_size_um=2.0)
    long = render_overlay(img, lab, title="x" * 180, pixel_size_um=2.0)
    assert long.size == short.size


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8, 16, 32, 64])
def test_downsample_plane_rounds_as_the_float_mean(factor):
    """The integer block means (pairwise sums for powers of two) equal ``rint`` of the float32 mean,
    ties to even included, and the coverage test equals ``mean >= 0.5`` of the covered flags."""
    from equislide.storage.labels import _pow2_block_sums, downsample_plane

    rng = np.random.default_rng(factor)
    for shape in ((37, 53, 3), (200, 130, 3)):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        a[::3], a[:, ::5] = 128, 127  # flat runs: block means on exact halves
        h, w = shape[:2]
        oh, ow = -(-h // factor), -(-w // factor)
        pad = ((0, oh * factor - h), (0, ow * factor - w))
        full = np.pad(a, (*pad, (0, 0)), mode="edge").astype(np.float32)
        want = np.rint(full.reshape(oh, factor, ow, factor, 3).mean(axis=(1, 3))).astype(np.uint8)
        assert np.array_equal(downsample_plane(a, factor)[0], want)
        if factor & (factor - 1) == 0:
            flags = np.pad(rng.random((h, w)) < 0.5, pad)
            share = flags.reshape(oh, factor, ow, factor).mean(axis=(1, 3))
            count = _pow2_block_sums(flags.view(np.uint8), factor).astype(np.int64)
            assert np.array_equal(2 * count >= factor * factor, share >= 0.5)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_prepared_image_levels_are_copied_byte_for_byte(tmp_path, version):
    """write_ome_zarr(image_levels=...) copies a pyramid write_image_levels made before: the same
    bytes as averaging the image itself; levels of another layout (chunk) are ignored, not copied."""
    from equislide.storage import write_image_levels

    image, clusters, tissue = _sample()
    kw = {"pixel_size_um": 8.0, "labels": {"clusters": clusters, "tissue": tissue}, "name": "B3"}
    kw |= {"min_side": 16, "ngff_version": version}
    plain = write_ome_zarr(tmp_path / "plain.ome.zarr", image, **kw)
    levels = write_image_levels(tmp_path / "levels", image, ngff_version=version, min_side=16)
    zarr.open_array(levels / "0", mode="r+")[0, 0, 0] = 1 + int(image[0, 0, 0]) % 200  # a mark shows a copy
    copied = write_ome_zarr(tmp_path / "copied.ome.zarr", image, image_levels=levels, **kw)

    def tree(p):
        return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}

    a, b = tree(plain), tree(copied)
    assert a.keys() == b.keys()
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ == ["0/c/0/0/0" if version == "0.5" else "0/0/0/0"], differ  # only the marked chunk
    zarr.open_array(levels / "0", mode="r+")[0, 0, 0] = image[0, 0, 0]
    assert tree(write_ome_zarr(tmp_path / "again.ome.zarr", image, image_levels=levels, **kw)) == a
    other = write_image_levels(tmp_path / "other", image, ngff_version=version, min_side=16, chunk=16)
    assert tree(write_ome_zarr(tmp_path / "ignored.ome.zarr", image, image_levels=other, **kw)) == a

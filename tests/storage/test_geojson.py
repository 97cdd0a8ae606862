"""QuPath GeoJSON: every polygon valid for JTS/GEOS, exact pixel areas, UUIDs, TMA cores.

The hand-written tracer this replaced joined pixels touching only at a corner into one ring through
the same vertex twice ("Ring Self-intersection"); these patterns are the cases to get right.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from equislide.storage import labels_to_geojson, tma_cores_to_geojson, write_geojson
from equislide.storage.geojson import label_polygons, ring_area
from equislide.tiling import fill_grid


def assert_valid_features(collection: dict) -> None:
    """Every feature's geometry passes GEOS validity (what JTS in QuPath needs for union and area)."""
    assert collection["type"] == "FeatureCollection"
    for feat in collection["features"]:
        geom = shape(feat["geometry"])
        assert geom.is_valid, (feat["properties"], shapely.is_valid_reason(geom))
        for poly in getattr(geom, "geoms", [geom]):
            rings = [poly.exterior, *poly.interiors]
            assert all(r.coords[0] == r.coords[-1] for r in rings)
            assert ring_area(poly.exterior.coords) > 0  # exterior counter-clockwise by the numbers
            assert all(ring_area(r.coords) < 0 for r in poly.interiors)  # holes clockwise


def assert_exact_areas(collection: dict, labels: np.ndarray, px_area: float = 1.0) -> None:
    """Areas equal the pixels' (to the rounding of coordinates to 2 decimals at a non-whole scale)."""
    for feat in collection["features"]:
        value = feat["properties"]["label_value"]
        assert shape(feat["geometry"]).area == pytest.approx((labels == value).sum() * px_area, rel=1e-8)


def _smooth_clusters(side: int, k: int, seed: int, sigma: float) -> np.ndarray:
    """A label map like a segmented slide: smooth noise cut into ``k`` clusters, background ring."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((side, side)), sigma)
    labels = (np.digitize(field, np.quantile(field, np.linspace(0, 1, k + 1)[1:-1])) + 1).astype(np.uint8)
    yy, xx = np.mgrid[:side, :side]
    labels[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 > (0.48 * side) ** 2] = 0
    return labels


CORNER_CASES = {
    "checkerboard": (np.indices((7, 9)).sum(axis=0) % 2).astype(np.uint8),
    "diagonal pair": np.array([[1, 0], [0, 1]], np.uint8),
    "anti-diagonal pair": np.array([[0, 1], [1, 0]], np.uint8),
    # A hole whose corner touches the outside at one point (the ring's pinch point).
    "hole touching the outer ring": np.array([[0, 1, 1], [1, 0, 1], [1, 1, 1]], np.uint8),
    # Two holes touching each other at a corner, inside one shell.
    "holes touching each other": np.pad(1 - np.eye(2, dtype=np.uint8), 1, constant_values=1),
    # Two clusters in a checkerboard of 2 x 2 blocks: both labels touch themselves at corners.
    "two-label checkerboard": (np.kron(np.indices((4, 4)).sum(axis=0) % 2, np.ones((2, 2))) + 1).astype(
        np.uint8
    ),
    "salt and pepper": (np.random.default_rng(0).random((64, 64)) < 0.5).astype(np.uint8)
    * np.random.default_rng(1).integers(1, 4, (64, 64)).astype(np.uint8),
}


@pytest.mark.parametrize("name", list(CORNER_CASES))
def test_corner_touching_pixels_give_valid_polygons_with_exact_areas(name):
    labels = CORNER_CASES[name]
    stride, l0_per_l, offset = 4, 2.5, (100.0, 50.0)
    fc = labels_to_geojson(labels, stride=stride, l0_per_l=l0_per_l, l0_offset=offset, simplify=0.0)
    assert {f["properties"]["label_value"] for f in fc["features"]} == set(np.unique(labels)) - {0}
    assert_valid_features(fc)
    assert_exact_areas(fc, labels, (stride * l0_per_l) ** 2)
    for simplify in (0.5, 2.0):  # simplified rings stay valid too
        assert_valid_features(labels_to_geojson(labels, stride=1, l0_per_l=1.0, simplify=simplify))


def test_pixels_touching_at_a_corner_are_separate_polygons():
    polys = label_polygons(CORNER_CASES["diagonal pair"], 1, simplify=0.0)
    assert len(polys) == 2 and all(len(p) == 1 and abs(ring_area(p[0])) == 1.0 for p in polys)
    ((shell, *holes),) = label_polygons(CORNER_CASES["hole touching the outer ring"], 1, simplify=0.0)
    assert shapely.Polygon(shell, holes).is_valid
    assert abs(ring_area(shell)) + sum(ring_area(h) for h in holes) == 7.0


def test_whole_slide_label_map_valid_exact_and_simplified(tmp_path):
    """A whole slide's worth of label pixels (1200 x 1200, four clusters with ragged borders)."""
    labels = _smooth_clusters(1200, 4, seed=2, sigma=6.0)
    exact = labels_to_geojson(labels, stride=16, l0_per_l=4.0, simplify=0.0)
    assert len(exact["features"]) == 4
    assert_valid_features(exact)
    assert_exact_areas(exact, labels, (16 * 4.0) ** 2)
    light = labels_to_geojson(labels, stride=16, l0_per_l=4.0)  # the default simplify
    assert_valid_features(light)
    n_exact = sum(shapely.get_num_coordinates(shape(f["geometry"])) for f in exact["features"])
    n_light = sum(shapely.get_num_coordinates(shape(f["geometry"])) for f in light["features"])
    assert n_light < 0.9 * n_exact
    for a, b in zip(exact["features"], light["features"], strict=True):
        area_a, area_b = shape(a["geometry"]).area, shape(b["geometry"]).area
        assert abs(area_b - area_a) / area_a < 0.02
    path = write_geojson(tmp_path / "slide.geojson", light)
    assert_valid_features(json.loads(path.read_text()))  # rounding to 2 decimals keeps them valid


def test_feature_ids_are_uuids_unique_and_reproducible(tmp_path):
    labels = _smooth_clusters(120, 3, seed=4, sigma=2.0)
    a = labels_to_geojson(labels, stride=4, l0_per_l=1.0, sample_id="tma01/B3")
    b = labels_to_geojson(labels, stride=4, l0_per_l=1.0, sample_id="tma01/B3")
    other = labels_to_geojson(labels, stride=4, l0_per_l=1.0, sample_id="tma01/B4")
    ids = [f["id"] for f in a["features"]]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(uuid.UUID(i).version == 5 for i in ids)
    assert not set(ids) & {f["id"] for f in other["features"]}
    first = write_geojson(tmp_path / "a.geojson", a).read_bytes()
    assert write_geojson(tmp_path / "b.geojson", b).read_bytes() == first  # a rerun writes the same bytes


def test_phantom_label_map_gives_valid_geojson(tmp_path):
    import tifffile

    from equislide.tiling import write_phantom

    info = write_phantom(tmp_path / "tma.tiff", cores=4, mpp=2.0, core_diameter_um=400.0, seed=5)
    labels = tifffile.imread(info.labels_path)
    fc = labels_to_geojson(labels, stride=1, l0_per_l=info.label_downsample, simplify=0.0)
    assert len(fc["features"]) == len(np.unique(labels)) - 1 >= 3
    assert_valid_features(fc)
    assert_exact_areas(fc, labels, info.label_downsample**2)
    assert_valid_features(labels_to_geojson(labels, stride=1, l0_per_l=info.label_downsample))


def test_real_slide_clusters_give_valid_geojson(shared_data):
    """Clusters of a real H&E slide's colours under its tissue mask (no network: a cheap real map)."""
    from sklearn.cluster import KMeans

    from equislide.tiling import open_slide, tissue_mask

    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        rgb, downsample = slide.thumbnail(max_size=512)
        mask = tissue_mask(rgb, mpp=slide.mpp[0] * downsample)
    pixels = rgb[mask].astype(np.float32)
    km = KMeans(n_clusters=4, n_init=1, random_state=0).fit(pixels[::7])
    labels = np.zeros(mask.shape, np.uint8)
    labels[mask] = km.predict(pixels) + 1
    exact = labels_to_geojson(labels, stride=1, l0_per_l=1.0, simplify=0.0)  # whole numbers: exact areas
    assert len(exact["features"]) == 4
    assert_valid_features(exact)
    assert_exact_areas(exact, labels)
    for simplify in (0.0, 0.5):  # in level-0 px, coordinates rounded to 2 decimals
        assert_valid_features(labels_to_geojson(labels, stride=1, l0_per_l=downsample, simplify=simplify))


def test_fill_grid_places_missing_cores_on_the_lattice():
    theta = np.deg2rad(3.0)  # a slightly rotated 3 x 4 array, pitch 100, cores 60 wide
    u, v = 100 * np.array([np.cos(theta), np.sin(theta)]), 100 * np.array([-np.sin(theta), np.cos(theta)])
    truth = {(r, c): np.array([500.0, 300.0]) + c * u + r * v for r in range(3) for c in range(4)}
    gone = {(1, 2), (2, 0)}
    boxes = {rc: (*(p - 30), *(p + 30)) for rc, p in truth.items() if rc not in gone}
    cells = fill_grid(boxes)
    assert [(c["row"], c["col"]) for c in cells] == sorted(truth)  # row-major, every position
    assert [c["name"] for c in cells[:5]] == ["A1", "A2", "A3", "A4", "B1"]
    assert {(c["row"], c["col"]) for c in cells if c["missing"]} == gone
    for c in cells:
        x0, y0, x1, y1 = c["bbox"]
        np.testing.assert_allclose([(x0 + x1) / 2, (y0 + y1) / 2], truth[(c["row"], c["col"])], atol=1e-6)
        assert x1 - x0 == pytest.approx(60) and y1 - y0 == pytest.approx(60)
    assert fill_grid({}) == []


def test_tma_cores_become_qupath_tma_core_objects():
    cells = fill_grid({(0, 0): (0, 0, 80, 80), (0, 1): (100, 0, 180, 80), (1, 1): (100, 100, 180, 180)})
    fc = tma_cores_to_geojson(cells, slide_id="tma01")
    assert_valid_tma(fc)
    props = [f["properties"] for f in fc["features"]]
    assert [(p["name"], p["isMissing"]) for p in props] == [
        ("A1", False),
        ("A2", False),
        ("B1", True),
        ("B2", False),
    ]
    assert all(p["objectType"] == "tmaCore" for p in props)
    # QuPath builds a core from the geometry's bounds: they are the boxes exactly.
    assert shape(fc["features"][1]["geometry"]).bounds == (100.0, 0.0, 180.0, 80.0)
    assert shape(fc["features"][2]["geometry"]).bounds == (0.0, 100.0, 80.0, 180.0)
    again = tma_cores_to_geojson(cells, slide_id="tma02")
    assert not {f["id"] for f in fc["features"]} & {f["id"] for f in again["features"]}
    with pytest.raises(ValueError, match="multiple of 4"):
        tma_cores_to_geojson(cells, vertices=30)


def assert_valid_tma(collection: dict) -> None:
    ids = [f["id"] for f in collection["features"]]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i) for i in ids)
    for feat in collection["features"]:
        geom = shape(feat["geometry"])
        assert geom.geom_type == "Polygon" and geom.is_valid and geom.area > 0
        assert feat["properties"]["objectType"] == "tmaCore" and isinstance(
            feat["properties"]["isMissing"], bool
        )

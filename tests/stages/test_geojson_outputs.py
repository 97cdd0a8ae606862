"""The segment stage's GeoJSON outputs end to end: every feature valid, TMA grids as tmaCore objects.

Real stores through the stages a run calls (tile, backbone, features, per-sample K-means, segment):
a phantom TMA with a missing core, and a real whole slide from ../shared/data.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from equislide import stages
from equislide.specs import ClusterSpec, FeatureSpec
from equislide.stages.segment import TMA_GEOJSON_SUFFIX, tma_slides, write_tma_geojson

SPEC = FeatureSpec(layer=3, model_kwargs={"width": 8}, calibration_tiles=4, device="cpu")
CLUSTER = ClusterSpec(k=3, per_sample=500, backend="torch")


def _segment(stores: list[Path], root: Path) -> list[dict]:
    net = stages.calibrated_backbone(stores, root / "models", SPEC)
    out = []
    for store in stores:
        stages.extract_store_features(store, net, SPEC)
        out.append(stages.segment_store(store, root / "samples", layer=SPEC.layer, spec=CLUSTER))
    return out


def _assert_valid_annotations(path: str | Path, l0_size: tuple[int, int]) -> list[dict]:
    fc = json.loads(Path(path).read_text())
    assert fc["features"], path
    for feat in fc["features"]:
        geom = shape(feat["geometry"])
        assert geom.geom_type == "MultiPolygon" and geom.is_valid, (path, shapely.is_valid_reason(geom))
        assert feat["properties"]["objectType"] == "annotation"
        assert uuid.UUID(feat["id"]).version == 5
        x0, y0, x1, y1 = geom.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= l0_size[0] and y1 <= l0_size[1], (path, geom.bounds)
    return fc["features"]


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    from equislide.tiling import write_phantom

    root = tmp_path_factory.mktemp("tma")
    info = write_phantom(root / "tma.tiff", cores=9, mpp=4.0, core_diameter_um=600.0, missing=1, seed=1)
    tiled = stages.tile_slide(info.image_path, root / "tiles", mpp=5.0, tile=128, halo=16, tma="yes")
    return info, root, [r.store for r in tiled], _segment([r.store for r in tiled], root)


def test_phantom_tma_outputs_are_valid_and_ids_unique(phantom_run):
    info, _, _, results = phantom_run
    ids = []
    for res in results:
        ids += [f["id"] for f in _assert_valid_annotations(res["outputs"]["geojson"], info.l0_size)]
    assert len(ids) == len(set(ids)) >= len(results)  # one UUID per cluster of each core, none shared


def test_phantom_tma_grid_is_written_as_tma_core_objects_with_the_missing_core(phantom_run):
    info, root, stores, _ = phantom_run
    slides = tma_slides(stores)
    assert list(slides) == ["tma"] and len(slides["tma"]) == 8
    path = write_tma_geojson("tma", slides["tma"], root / "samples")
    assert path == str(root / "samples" / f"tma{TMA_GEOJSON_SUFFIX}")
    first = Path(path).read_bytes()
    assert write_tma_geojson("tma", slides["tma"][::-1], root / "samples") == path
    assert Path(path).read_bytes() == first  # a rerun (in any order) writes the same bytes
    features = json.loads(first)["features"]
    truth = {c.name: c for c in info.cores}
    assert [f["properties"]["name"] for f in features] == [c.name for c in info.cores]  # row-major, 3 x 3
    pitch = info.pitch_um / info.mpp
    for feat in features:
        props, geom = feat["properties"], shape(feat["geometry"])
        assert props["objectType"] == "tmaCore" and geom.is_valid
        core = truth[props["name"]]
        assert props["isMissing"] is (not core.present)
        # Found and missing cores alike sit on their true grid node (the missing one by the lattice).
        cx, cy = geom.centroid.coords[0]
        assert np.hypot(cx - core.l0_x, cy - core.l0_y) < 0.35 * pitch, (props["name"], (cx, cy))
        x0, y0, x1, y1 = geom.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= info.l0_size[0] and y1 <= info.l0_size[1]
        assert (props["metadata"].get("sample_id") is None) is props["isMissing"]
    assert sum(f["properties"]["isMissing"] for f in features) == 1
    assert len({f["id"] for f in features}) == 9
    with pytest.raises(ValueError, match="not a TMA core of slide 'other'"):
        write_tma_geojson("other", slides["tma"], root / "samples")


def test_real_whole_slide_outputs_are_valid(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    tiled = stages.tile_slide(slide, tmp_path / "tiles", mpp=8.0, tile=128, halo=16, tma="no")
    assert [r.sample_id for r in tiled] == ["CMU-1-Small-Region"] and tiled[0].n_tiles > 1
    (res,) = _segment([tiled[0].store], tmp_path)
    feats = _assert_valid_annotations(res["outputs"]["geojson"], (2220, 2967))
    assert len(feats) >= 2
    assert tma_slides([tiled[0].store]) == {}  # a whole slide has no TMA grid

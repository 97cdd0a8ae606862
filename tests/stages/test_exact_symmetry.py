"""End to end, the square's 8 symmetries commute with segmentation: tiles, features, K-means, label map.

Every input is given in its 8 transformed copies (rot90 by k = 0..3, with and without a flip) in one
cohort, through the stages a run calls (tile, backbone, features, cluster, segment); each copy's
final cluster map and tissue map, transformed back, must equal the original's pixel for pixel:
100.00 %, not 99.9 %. Real H&E (../shared/data) as whole slides (many tiles with halos) and as a
single TMA-core-like image stored whole, at two analysis resolutions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from equislide import stages
from equislide.specs import ClusterSpec, FeatureSpec, TilingSpec

pytestmark = pytest.mark.slow

SYMMETRIES = [(k, flip) for flip in (False, True) for k in range(4)]


def _forward(img: np.ndarray, k: int, flip: bool) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(img[:, ::-1] if flip else img, k))


def _back(img: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(img, -k)
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _segment_copies(image: np.ndarray, root: Path, tiling: TilingSpec, layer: int) -> dict:
    paths = []
    for k, flip in SYMMETRIES:
        path = root / f"copy-k{k}{'-flip' if flip else ''}.png"
        Image.fromarray(_forward(image, k, flip)).save(path)
        paths.append(path)
    stores = []
    for path in paths:
        stores += [r.store for r in stages.tile_slide(path, root / "tiles", tiling)]
    spec = FeatureSpec(layer=layer, model_kwargs={"width": 8}, calibration_tiles=8, device="cpu")
    net = stages.calibrated_backbone(stores, root / "models", spec)
    for store in stores:
        stages.extract_store_features(store, net, spec)
    cluster = ClusterSpec(k=3, per_sample=500, backend="torch")
    km = stages.fit_cohort_stores(stores, root / "models", layer=layer, spec=cluster)
    maps = {}
    for (k, flip), store in zip(SYMMETRIES, stores, strict=True):
        res = stages.segment_store(store, root / "samples", layer=layer, spec=cluster, kmeans=km)
        group = zarr.open_group(res["outputs"]["ome_zarr"], mode="r")
        maps[(k, flip)] = {
            name: _back(np.asarray(group["labels"][name]["0"][:]), k, flip) for name in ("clusters", "tissue")
        }
    return maps


def _assert_exact(maps: dict) -> None:
    ref = maps[(0, False)]
    assert (ref["tissue"] > 0).sum() > 0.1 * ref["tissue"].size  # there is tissue to agree on
    assert len(np.unique(ref["clusters"][ref["clusters"] > 0])) >= 2
    for key, m in maps.items():
        for name in ("tissue", "clusters"):
            assert m[name].shape == ref[name].shape, (key, name)
            agree = float((m[name] == ref[name]).mean())
            assert agree == 1.0, f"symmetry {key}: {name} agree on {100 * agree:.4f}% of pixels"


@pytest.mark.parametrize(
    ("image", "crop", "mpp", "tile", "halo", "layer"),
    [
        ("images/he-carcinoma-1000.png", 1000, 2.0, 64, 16, 3),
        ("images/histoqc-template1.png", 500, 1.0, 96, 16, 2),
        ("slides/CMU-1-Small-Region.svs", 2960, 2.5, 128, 16, 3),  # 2220 x 2960 px: not square
    ],
)
def test_whole_slide_labels_commute_with_the_square(
    shared_data, tmp_path, image, crop, mpp, tile, halo, layer
):
    if image.startswith("slides/"):  # a real slide's level 0, as a plain image the copies can turn
        from equislide.tiling import open_slide

        with open_slide(shared_data / image) as slide:
            rgb = slide.read_region((0, 0), 0, slide.dimensions)
    else:
        rgb = np.asarray(Image.open(shared_data / image).convert("RGB"))
    rgb = np.ascontiguousarray(rgb[:crop, :crop, :3])
    tiling = TilingSpec(mpp=mpp, tile=tile, halo=halo, input_mpp=0.5, tma="no")
    maps = _segment_copies(rgb, tmp_path, tiling, layer)
    _assert_exact(maps)


def test_core_stored_whole_commutes_with_the_square(shared_data, tmp_path):
    """A core-sized image tiled as one tile (the TMA-core path: tile = image, no halo)."""
    rgb = np.asarray(Image.open(shared_data / "images" / "he-carcinoma-1000.png").convert("RGB"))[:768, :768]
    tiling = TilingSpec(mpp=2.0, tile=192, halo=0, input_mpp=0.5, tma="no")
    maps = _segment_copies(rgb, tmp_path, tiling, 3)
    _assert_exact(maps)

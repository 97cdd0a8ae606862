"""bf16 end to end on real H&E (../shared/data): label maps against fp32, the rot90 property, keys.

The network is the run's untrained SRENet-18 with BatchNorm recalibrated (as ``segment`` runs it
without weights); features go through the stages a run calls (tile, backbone, features, cluster,
segment) at ``precision="fp32"`` and ``"bf16"`` (autocast, emulated on a CPU without bf16 units).
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

# A TMA-core-sized crop stored whole (one tile). The agreement runs the product's network (width 64,
# layer 4) at 1 µm/px (2304 feature pixels); the rot90 and key checks a width-16 one at layer 3 and
# 2 µm/px: small enough for two loaded CPU cores.
TILING = TilingSpec(mpp=2.0, tile=192, halo=0, input_mpp=0.5, tma="no")
FULL_TILING = TilingSpec(mpp=1.0, tile=384, halo=0, input_mpp=0.5, tma="no")
LAYER = 3
CLUSTER = ClusterSpec(k=3, per_sample=2000, backend="torch")


def _spec(precision: str, *, layer: int = LAYER, width: int | None = 16) -> FeatureSpec:
    return FeatureSpec(
        layer=layer,
        model_kwargs={"width": width} if width else {},
        calibration_tiles=8,
        device="cpu",
        precision=precision,
    )


def _labels(res: dict) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(res["outputs"]["ome_zarr"], mode="r")
    return np.asarray(group["labels"]["clusters"]["0"][:]), np.asarray(group["labels"]["tissue"]["0"][:])


@pytest.fixture(scope="module")
def core(shared_data) -> np.ndarray:
    return np.asarray(Image.open(shared_data / "images" / "he-carcinoma-1000.png").convert("RGB"))[:768, :768]


def _tile(image: np.ndarray, root: Path, name: str, tiling: TilingSpec = TILING) -> str:
    path = root / f"{name}.png"
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path)
    (res,) = stages.tile_slide(path, root / "tiles", tiling)
    return res.store


def test_bf16_labels_agree_with_fp32_on_tissue(core, tmp_path):
    """One K-means (fitted on the fp32 features) predicts both, and each precision fits its own
    (labels matched by the Hungarian method): the share of tissue pixels whose labels agree."""
    from scipy.optimize import linear_sum_assignment

    from equislide.storage import read_features_meta

    runs = {}
    for precision in ("fp32", "bf16"):
        root = tmp_path / precision
        store = _tile(core, root, "core", FULL_TILING)
        spec = _spec(precision, layer=4, width=None)
        net = stages.calibrated_backbone([store], root / "models", spec)
        assert net.precision == precision
        res = stages.extract_store_features(store, net, spec)
        assert res["status"] == "written"
        assert read_features_meta(store, 4)["precision"] == precision
        runs[precision] = {"store": store, "net": net, "root": root}
    assert runs["fp32"]["net"].sha256 == runs["bf16"]["net"].sha256  # one network, two precisions
    assert runs["fp32"]["net"].key() != runs["bf16"]["net"].key()
    km32 = stages.fit_cohort_stores([runs["fp32"]["store"]], tmp_path / "km32", layer=4, spec=CLUSTER)
    kmbf = stages.fit_cohort_stores([runs["bf16"]["store"]], tmp_path / "kmbf", layer=4, spec=CLUSTER)
    shared, own = {}, {}
    for precision, run in runs.items():
        shared[precision] = _labels(
            stages.segment_store(run["store"], run["root"] / "shared", layer=4, spec=CLUSTER, kmeans=km32)
        )
        own[precision] = _labels(
            stages.segment_store(
                run["store"],
                run["root"] / "own",
                layer=4,
                spec=CLUSTER,
                kmeans=km32 if precision == "fp32" else kmbf,
            )
        )
    tissue = shared["fp32"][1] > 0
    assert (shared["bf16"][1] == shared["fp32"][1]).all()  # the tissue mask does not see the network
    assert tissue.sum() > 1000 and len(np.unique(shared["fp32"][0][tissue])) == CLUSTER.k
    a, b = shared["fp32"][0][tissue], shared["bf16"][0][tissue]
    agree = float((a == b).mean())
    print(f"bf16 vs fp32, fp32's K-means: {100 * agree:.2f}% of {tissue.sum()} tissue pixels")
    a, b = own["fp32"][0][tissue], own["bf16"][0][tissue]
    confusion = np.zeros((CLUSTER.k + 1, CLUSTER.k + 1), np.int64)
    np.add.at(confusion, (a, b), 1)
    rows, cols = linear_sum_assignment(-confusion)
    matched = float(confusion[rows, cols].sum() / tissue.sum())
    print(f"bf16 vs fp32, own K-means each, Hungarian-matched: {100 * matched:.2f}%")
    # The goal: >= 99.5 % with one K-means (99.78 % measured; 99.26 % with the stem in bf16,
    # see SREStem). Own fits are reported, not bounded beyond chance (a third for k = 3): K-means on
    # untrained features lands on another partition from slightly moved vectors (87 % with one
    # BatchNorm calibration, 50 % with another), which says more about untrained K-means than bf16.
    assert agree >= 0.995, agree
    assert matched > 1 / CLUSTER.k, matched


def test_bf16_label_maps_commute_with_rot90(core, tmp_path):
    """The core and its rot90 copies in one bf16 cohort: every label map, rotated back, against the
    original's. fp32 is exact (tests/stages/test_exact_symmetry.py). bf16 is exact on CPUs with bf16
    units (the ring path's features are bit-identical under rot90, tests/models/test_sre_conv.py); the
    bound allows for a last-bit difference of accumulation order elsewhere, which autocast's rounding
    to 8 mantissa bits would carry on (0 / 0.04 / 0 % measured for k = 1 / 2 / 3 before the ring path
    ran under bf16)."""
    stores = [_tile(np.rot90(core, k), tmp_path, f"core-k{k}") for k in range(4)]
    net = stages.calibrated_backbone(stores, tmp_path / "models", _spec("bf16"))
    for store in stores:
        stages.extract_store_features(store, net, _spec("bf16"))
    km = stages.fit_cohort_stores(stores, tmp_path / "models", layer=LAYER, spec=CLUSTER)
    maps = [
        np.rot90(
            _labels(stages.segment_store(s, tmp_path / "samples", layer=LAYER, spec=CLUSTER, kmeans=km))[0],
            -k,
        )
        for k, s in enumerate(stores)
    ]
    tissue = maps[0] > 0
    assert tissue.sum() > 1000
    differ = {k: float((m != maps[0]).mean()) for k, m in enumerate(maps[1:], start=1)}
    print("bf16 rot90, pixels differing: " + ", ".join(f"k={k} {100 * v:.4f}%" for k, v in differ.items()))
    from equislide.models.extract import bf16_native

    if bf16_native("cpu"):
        assert max(differ.values()) == 0, differ
    assert max(differ.values()) <= 0.002, differ  # at most 0.2 % of the map


def test_a_bf16_run_does_not_reuse_fp32_features(core, tmp_path):
    store = _tile(core, tmp_path, "core")
    net32 = stages.calibrated_backbone([store], tmp_path / "models", _spec("fp32"))
    netbf = stages.calibrated_backbone([store], tmp_path / "models", _spec("bf16"))
    assert stages.extract_store_features(store, net32, _spec("fp32"))["status"] == "written"
    assert stages.extract_store_features(store, net32, _spec("fp32"))["status"] == "skipped"
    assert stages.extract_store_features(store, netbf, _spec("bf16"))["status"] == "written"
    assert stages.extract_store_features(store, net32, _spec("fp32"))["status"] == "written"

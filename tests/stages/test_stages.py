"""The backbone, features and cluster stages on real tile stores (a phantom TMA written to disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from equislide import stages
from equislide.specs import ClusterSpec, FeatureSpec
from equislide.stages import cluster, features


@pytest.fixture(scope="module")
def featured_stores(tmp_path_factory) -> tuple[list[Path], Path]:
    """Four phantom cores tiled, with layer-3 features of a width-8 SRENet (BatchNorm calibrated)."""
    from equislide.tiling import write_phantom

    root = tmp_path_factory.mktemp("pipeline")
    info = write_phantom(root / "tma.tiff", cores=4, mpp=4.0, core_diameter_um=600.0, missing=0, seed=1)
    stores = [r.store for r in stages.tile_slide(info.image_path, root / "tiles", mpp=5.0, tile=128, halo=16)]
    spec = FeatureSpec(layer=3, model_kwargs={"width": 8}, calibration_tiles=4, device="cpu")
    backbone = stages.calibrated_backbone(stores, root / "models", spec)
    for store in stores:
        stages.extract_store_features(store, backbone, spec)
    return stores, root


def test_parallel_draws_give_the_one_sampler_fit(featured_stores, tmp_path) -> None:
    """Each sample's draw on its own (as feature tasks make them) stacks into exactly the vectors one
    StratifiedSampler over every store gives, so the cohort K-means is the same model."""
    from equislide.models.kmeans import KMeansModel, StratifiedSampler, fit_kmeans

    stores, _ = featured_stores
    sampler = StratifiedSampler(300, seed=5)
    from equislide.storage import read_features_meta

    for store in stores:
        features.sample_tissue_vectors(store, 3, int(read_features_meta(store, 3)["stride"]), sampler)
    spec = ClusterSpec(k=3, per_sample=300, backend="torch", seed=5)
    reference = fit_kmeans(sampler.sample, params=spec.kmeans_params())

    draws = tmp_path / "models" / stages.DRAWS_DIR
    first = stages.draw_store_vectors(stores[2], draws, layer=3, spec=spec)  # a "worker" drew it
    assert first["status"] == "written" and 0 < first["n_vectors"] <= 300
    again = stages.draw_store_vectors(stores[2], draws, layer=3, spec=spec)
    assert again == {"path": first["path"], "status": "skipped", "n_vectors": None}
    drawn = np.load(first["path"])
    assert drawn.dtype == np.float16 and drawn.shape[0] == first["n_vectors"]

    info = cluster.fit_cohort_stores(stores, tmp_path / "models", layer=3, spec=spec)
    assert info.status == "written" and info.n_vectors == len(sampler.sample)
    assert len(list(draws.glob("draw-*.npy"))) == len(stores)  # the missing three were drawn by the fit
    model = KMeansModel.load(info.path)
    np.testing.assert_array_equal(model.centroids, reference.centroids)
    other = stages.draw_store_vectors(stores[2], draws, layer=3, spec=ClusterSpec(per_sample=300, seed=6))
    assert other["path"] != first["path"]  # another seed is another draw


@pytest.mark.parametrize(
    ("sizes", "cap", "expected"),
    [
        ([5, 7, 9], 100, [5, 7, 9]),  # under the cap: every vector
        ([10, 10, 10], 9, [3, 3, 3]),
        ([2, 50, 50], 42, [2, 20, 20]),  # the small sample gives all; the rest shared equally
        ([0, 8, 8], 5, [0, 3, 2]),  # the remainder, one vector each, to the first open ones
    ],
)
def test_cohort_quotas_fill_the_cap_equally(sizes, cap, expected) -> None:
    quotas = cluster._quotas(sizes, cap)
    assert quotas == expected
    assert sum(quotas) == min(cap, sum(sizes))


def test_cohort_fit_is_capped_at_cohort_vectors(featured_stores, tmp_path) -> None:
    """Past ``cohort_vectors`` every sample gives an equal seeded share of its draw, the same on a
    rerun; under it the fit (and its key) is what it was without the cap."""
    stores, _ = featured_stores
    free = ClusterSpec(k=3, per_sample=300, backend="torch", seed=5)
    draws = tmp_path / "models" / stages.DRAWS_DIR
    sizes = [stages.draw_store_vectors(s, draws, layer=3, spec=free)["n_vectors"] for s in stores]
    full = cluster.fit_cohort_stores(stores, tmp_path / "models", layer=3, spec=free)
    assert full.n_vectors == sum(sizes)
    roomy = ClusterSpec(k=3, per_sample=300, backend="torch", seed=5, cohort_vectors=len(stores) * 300)
    assert cluster.fit_cohort_stores(stores, tmp_path / "models", layer=3, spec=roomy).path == full.path

    cap = sum(sizes) // 2
    capped_spec = ClusterSpec(k=3, per_sample=300, backend="torch", seed=5, cohort_vectors=cap)
    capped = cluster.fit_cohort_stores(stores, tmp_path / "capped", layer=3, spec=capped_spec)
    assert Path(capped.path).name != Path(full.path).name  # keyed by the cap that binds
    assert capped.n_vectors == cap
    again = cluster.fit_cohort_stores(stores, tmp_path / "again", layer=3, spec=capped_spec)
    from equislide.models.kmeans import KMeansModel

    np.testing.assert_array_equal(
        KMeansModel.load(again.path).centroids, KMeansModel.load(capped.path).centroids
    )
    with pytest.raises(ValueError, match="cohort_vectors"):
        ClusterSpec(k=3, cohort_vectors=2)


def test_feature_extraction_hands_its_pooled_buffers_back(featured_stores, tmp_path, monkeypatch) -> None:
    from equislide.models import _buffers

    stores, root = featured_stores
    fresh = stages.tile_slide(root / "tma.tiff", tmp_path / "tiles", mpp=5.0, tile=128, halo=16)[0].store
    spec = FeatureSpec(layer=3, model_kwargs={"width": 8}, calibration_tiles=4, device="cpu")
    backbone = stages.calibrated_backbone(stores, root / "models", spec)
    held: list[int] = []

    def release() -> None:
        held.append(_buffers.held_bytes())
        _buffers.release()

    monkeypatch.setattr("equislide.models.release_buffers", release)
    result = stages.extract_store_features(fresh, backbone, spec)
    assert result["status"] == "written" and result["tiles_done"] > 0
    assert held and held[0] > 0  # the forward passes took their outputs from the pool...
    assert _buffers.held_bytes() == 0  # ...and handed them back at the end

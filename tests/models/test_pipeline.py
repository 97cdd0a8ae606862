"""The per-sample stages of ``equislide segment`` on real tile stores (a phantom TMA written to disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from equislide.models import pipeline as seg


@pytest.fixture(scope="module")
def featured_stores(tmp_path_factory) -> tuple[list[Path], Path]:
    """Four phantom cores tiled, with layer-3 features of a width-8 SRENet (BatchNorm calibrated)."""
    from equislide.tiling import tile_slide, write_phantom

    root = tmp_path_factory.mktemp("pipeline")
    info = write_phantom(root / "tma.tiff", cores=4, mpp=4.0, core_diameter_um=600.0, missing=0, seed=1)
    stores = [r.store for r in tile_slide(info.image_path, root / "tiles", mpp=5.0, tile=128, halo=16)]
    backbone = seg.calibrated_backbone(
        stores, root / "models", layer=3, model_kwargs={"width": 8}, calibration_tiles=4
    )
    for store in stores:
        seg.extract_store_features(store, backbone, device="cpu")
    return stores, root


def test_parallel_draws_give_the_one_sampler_fit(featured_stores, tmp_path) -> None:
    """Each sample's draw on its own (as feature tasks make them) stacks into exactly the vectors one
    StratifiedSampler over every store gives, so the cohort K-means is the same model."""
    from equislide.models.kmeans import KMeansModel, StratifiedSampler, fit_kmeans

    stores, _ = featured_stores
    sampler = StratifiedSampler(300, seed=5)
    from equislide.storage import read_features_meta

    for store in stores:
        seg._sample_tissue_vectors(store, 3, int(read_features_meta(store, 3)["stride"]), sampler)
    reference = fit_kmeans(sampler.sample, params=seg._kmeans_params(3, "torch", 5))

    draws = tmp_path / "models" / seg.DRAWS_DIR
    first = seg.draw_store_vectors(stores[2], draws, layer=3, per_sample=300, seed=5)  # a "worker" drew it
    assert first["status"] == "written" and 0 < first["n_vectors"] <= 300
    again = seg.draw_store_vectors(stores[2], draws, layer=3, per_sample=300, seed=5)
    assert again == {"path": first["path"], "status": "skipped", "n_vectors": None}
    drawn = np.load(first["path"])
    assert drawn.dtype == np.float16 and drawn.shape[0] == first["n_vectors"]

    info = seg.fit_cohort_stores(
        stores, tmp_path / "models", layer=3, k=3, per_sample=300, backend="torch", seed=5
    )
    assert info["status"] == "written" and info["n_vectors"] == len(sampler.sample)
    assert len(list(draws.glob("draw-*.npy"))) == len(stores)  # the missing three were drawn by the fit
    model = KMeansModel.load(info["path"])
    np.testing.assert_array_equal(model.centroids, reference.centroids)
    other = seg.draw_store_vectors(stores[2], draws, layer=3, per_sample=300, seed=6)
    assert other["path"] != first["path"]  # another seed is another draw

"""The cluster stage: one K-means model for the cohort, or one per sample (the paper's protocol).

:func:`fit_cohort_stores` stacks the per-sample draws the feature tasks left
(:func:`~equislide.stages.features.draw_store_vectors`, drawing any that are missing) and fits once;
:func:`fit_store` fits one sample alone on up to ``per_sample`` of its tissue vectors. Vectors are
always L2-normalised (:meth:`ClusterSpec.kmeans_params`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from equislide.specs import CLUSTER_FORMAT, ClusterSpec, KMeansRef
from equislide.stages.features import DRAWS_DIR, draw_store_vectors, sample_tissue_vectors

__all__ = ["cohort_identity", "fit_cohort_stores", "fit_store", "split_native"]


def split_native(stores: Sequence[str | Path], *, fit_native: bool = False) -> tuple[list, list]:
    """``(to fit, left out)``: the stores a cohort K-means is fitted on, and those tiled at native
    pixels (no usable resolution) that it leaves out unless ``fit_native``.

    Features of a slide at native pixels describe structures at another scale than everyone
    else's (a 0.25 µm/px scan read 10x too fine), so pooling them bends the cohort's clusters.
    """
    from equislide.storage import read_sample_meta

    fit, left_out = [], []
    for store in stores:
        meta = read_sample_meta(store)
        # Stores from before the flag: native pixels meant no mpp at all.
        native = meta.get("native_pixels", meta.get("mpp") is None and meta.get("mpp_source") is None)
        (left_out if native and not fit_native else fit).append(store)
    return fit, left_out


def cohort_identity(stores: Sequence[str | Path], *, layer: int, spec: ClusterSpec) -> dict:
    """What a cohort model is keyed by: the parameters and every store's identity and features."""
    from equislide.storage import features_key, store_identity

    return {
        "format": CLUSTER_FORMAT,
        "mode": "cohort",
        "k": int(spec.k),
        "per_sample": int(spec.per_sample),
        "seed": int(spec.seed),
        "backend": spec.backend,
        "features": [{**store_identity(s), "features": features_key(s, layer)} for s in stores],
    }


def _kmeans_intact(path: Path) -> bool:
    """A saved K-means model loads (header, checksum, centroids); otherwise it is fitted again."""
    from equislide.models._errors import CheckpointError
    from equislide.models.kmeans import KMeansModel

    try:
        KMeansModel.load(path)
    except (CheckpointError, OSError):
        return False
    return True


def fit_cohort_stores(
    stores: Sequence[str | Path], out_dir: str | Path, *, layer: int, spec: ClusterSpec | None = None
) -> KMeansRef:
    """One K-means model for the cohort, from at most ``spec.per_sample`` tissue vectors of each store.

    The model is saved as ``kmeans-cohort-<key>.safetensors`` under ``out_dir``, the key hashing the
    stores' features and the K-means parameters; an existing one is reused.
    """
    from equislide.files import read_json, sha256_file
    from equislide.models.kmeans import fit_kmeans
    from equislide.storage import params_hash, store_identity

    spec = spec or ClusterSpec()
    stores = sorted((Path(s) for s in stores), key=lambda s: str(store_identity(s)["sample_id"]))
    if not stores:
        raise ValueError("no sample with features to fit K-means on")
    identity = cohort_identity(stores, layer=layer, spec=spec)
    key = params_hash(identity)[:16]
    from equislide.storage.confine import confined

    path = confined(out_dir, Path(out_dir) / f"kmeans-cohort-{key}.safetensors")
    if path.with_suffix(".json").is_file() and _kmeans_intact(path):
        doc = read_json(path.with_suffix(".json")) or {}
        return KMeansRef(
            path=str(path),
            sha256=sha256_file(path),
            status="skipped",
            backend=doc.get("backend"),
            n_vectors=doc.get("n_vectors"),
            samples=len(stores),
        )
    parts = []
    for store in stores:  # each sample's draw, as the feature tasks left it (or drawn now)
        drawn = draw_store_vectors(store, Path(out_dir) / DRAWS_DIR, layer=layer, spec=spec)
        vectors = np.load(drawn["path"]).astype(np.float32)
        if vectors.size:
            parts.append(vectors)
    stacked = np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
    model = fit_kmeans(stacked, params=spec.kmeans_params())
    model.save(path, provenance=identity)
    return KMeansRef(
        path=str(path),
        sha256=sha256_file(path),
        status="written",
        backend=model.backend,
        n_vectors=int(model.n_vectors),
        samples=len(stores),
    )


def fit_store(store: str | Path, *, layer: int, stride: int, spec: ClusterSpec | None = None):
    """A K-means model of one sample alone, on up to ``spec.per_sample`` of its tissue vectors."""
    from equislide.models.kmeans import StratifiedSampler, fit_kmeans

    spec = spec or ClusterSpec()
    sampler = StratifiedSampler(spec.per_sample, seed=spec.seed)
    sample_tissue_vectors(store, layer, stride, sampler)
    return fit_kmeans(sampler.sample, params=spec.kmeans_params())

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

    identity = {
        "format": CLUSTER_FORMAT,
        "mode": "cohort",
        "k": int(spec.k),
        "per_sample": int(spec.per_sample),
        "seed": int(spec.seed),
        "backend": spec.backend,
        "features": [{**store_identity(s), "features": features_key(s, layer)} for s in stores],
    }
    # Only a cohort the cap can bind keys by it, so smaller cohorts keep the models they had.
    if len(stores) * spec.per_sample > spec.cohort_vectors:
        identity["cohort_vectors"] = int(spec.cohort_vectors)
    return identity


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
    # Each sample's draw, as the feature tasks left it (or drawn now); only its shape is read here.
    draws = [
        draw_store_vectors(store, Path(out_dir) / DRAWS_DIR, layer=layer, spec=spec)["path"]
        for store in stores
    ]
    shapes = [np.load(d, mmap_mode="r").shape for d in draws]
    sizes = [s[0] if len(s) == 2 and s[1] else 0 for s in shapes]
    quotas = _quotas(sizes, spec.cohort_vectors)
    width = next((s[1] for s, n in zip(shapes, sizes, strict=True) if n), 0)
    # Filled in place: stacking a list of parts would hold the cohort's vectors twice.
    stacked = np.empty((sum(quotas), width), np.float32)
    row = 0
    for i, (draw, n, q) in enumerate(zip(draws, sizes, quotas, strict=True)):
        if not q:
            continue
        vectors = np.load(draw, mmap_mode="r")
        if q < n:  # the cap binds: a seeded subset, the same whatever the order the draws were made in
            keep = np.sort(np.random.default_rng([spec.seed, i]).choice(n, q, replace=False))
            vectors = vectors[keep]
        stacked[row : row + q] = vectors
        row += q
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


def _quotas(sizes: Sequence[int], cap: int) -> list[int]:
    """Vectors taken from each sample: all of them under ``cap`` in total, else equal shares (water
    filling: a sample with fewer than its share gives all it has and the rest is shared out again)."""
    if sum(sizes) <= cap:
        return list(sizes)
    quotas = [0] * len(sizes)
    left, open_ = cap, sorted(range(len(sizes)), key=lambda i: sizes[i])
    while open_:
        share = left // len(open_)
        if sizes[open_[0]] <= share:
            i = open_.pop(0)
            quotas[i] = sizes[i]
            left -= sizes[i]
            continue
        for j, i in enumerate(open_):  # the remainder goes to the first ones, one vector each
            quotas[i] = share + (1 if j < left - share * len(open_) else 0)
        break
    return quotas


def fit_store(store: str | Path, *, layer: int, stride: int, spec: ClusterSpec | None = None):
    """A K-means model of one sample alone, on up to ``spec.per_sample`` of its tissue vectors."""
    from equislide.models.kmeans import StratifiedSampler, fit_kmeans

    spec = spec or ClusterSpec()
    sampler = StratifiedSampler(spec.per_sample, seed=spec.seed)
    sample_tissue_vectors(store, layer, stride, sampler)
    return fit_kmeans(sampler.sample, params=spec.kmeans_params())

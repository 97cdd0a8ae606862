"""The features stage: float16 features of every tile of a store, and its share of the K-means vectors.

:func:`extract_store_features` writes ``features/layer{L}`` beside the tiles
(:func:`equislide.storage.open_features_for_write`), keyed by :meth:`BackboneRef.key`; then, for a
cohort fit, :func:`draw_store_vectors` draws the sample's share of the cohort K-means' vectors right
away, on the same worker, so the fit only stacks files.

Coordinates: feature maps are ``f_`` px (``stride`` analysis px each); tile coordinates in the
stores are the interiors' top-left corners in analysis px.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equislide.specs import CLUSTER_FORMAT, BackboneRef, ClusterSpec, FeatureSpec

__all__ = [
    "DRAWS_DIR",
    "draw_store_vectors",
    "extract_store_features",
    "feature_batches",
    "sample_tissue_vectors",
    "store_features_and_draw",
    "tile_feature_masks",
]

#: Folder (under the models folder) of the per-sample vector draws of the cohort K-means.
DRAWS_DIR = "draws"
#: Tiles read per step when streaming features (one shard).
STREAM_TILES = 32


def extract_store_features(
    store: str | Path, backbone: BackboneRef, spec: FeatureSpec | None = None
) -> dict[str, Any]:
    """Compute and store float16 features of every tile of ``store`` (skipped when already done).

    Args:
        store: A finished tile store.
        backbone: What :func:`~equislide.stages.backbone.calibrated_backbone` returned.
        spec: Device and batch size (``spec.device``, ``spec.batch_tiles``); the network is ``backbone``.

    Returns:
        ``{"sample_id", "status" ("written" | "skipped"), "n_tiles", "seconds", "device"}``.
    """
    from equislide.models.extract import extract_features
    from equislide.stages.backbone import load_backbone, read_tiles
    from equislide.storage import is_features_done, open_features_for_write, read_sample_meta

    spec = spec or FeatureSpec(backbone=backbone.backbone, layer=backbone.layer)
    t0 = time.perf_counter()
    meta = read_sample_meta(store)
    layer = int(backbone.layer)
    params = backbone.params()
    out = {"sample_id": meta["sample_id"], "n_tiles": int(meta["n_tiles"])}
    if is_features_done(store, layer, params=params):
        return {**out, "status": "skipped", "seconds": 0.0, "device": None}
    model, info = load_backbone(backbone, spec.device)
    attrs = {
        **{k: info[k] for k in ("backbone", "stride", "normalisation", "weights", "model_config")},
        "halo_cropped": int(meta["halo"]),
        "weights_provenance": dict(backbone.provenance or {}),
    }
    n = int(meta["n_tiles"])
    with open_features_for_write(
        store,
        layer,
        channels=int(info["channels"]),
        f_tile=int(meta["tile"]) // int(info["stride"]),
        attrs=attrs,
        params=params,
    ) as writer:
        for start in range(0, n, spec.batch_tiles):
            tiles = read_tiles(store, start, min(n, start + spec.batch_tiles))
            feats = extract_features(model, tiles, layer=layer, halo=int(meta["halo"]), device=info["device"])
            writer.write(start, feats)
    return {
        **out,
        "status": "written",
        "seconds": round(time.perf_counter() - t0, 3),
        "device": info["device"],
    }


def tile_feature_masks(store: str | Path, stride: int) -> np.ndarray:
    """Boolean tissue masks of every tile interior at feature resolution, ``(n_tiles, f, f)``.

    The store's thumbnail tissue mask is sampled at the centre of each feature pixel (as
    :func:`equislide.storage.stitch_labels` does), so the masks match the stitched label map.
    """
    import zarr

    from equislide.storage import read_sample_meta, stitch_labels

    meta = read_sample_meta(store)
    group = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
    coords = np.asarray(group["coords"][:])
    f = int(meta["tile"]) // int(stride)
    n = len(coords)
    if n == 0:
        return np.zeros((0, f, f), bool)
    origin = coords.min(0)
    rel = coords - origin
    ones = np.zeros((n, f, f), np.int64)
    kwargs: dict[str, Any] = {}
    if "tissue_mask" in group:
        kwargs = {
            "tissue_mask": np.asarray(group["tissue_mask"][:]),
            "mask_downsample": float(group["tissue_mask"].attrs["downsample"]),
            "mask_origin": tuple(meta.get("tissue_mask_l_origin") or (0.0, 0.0)),
        }
    tissue = stitch_labels(ones, coords, stride=int(stride), l_origin=tuple(int(v) for v in origin), **kwargs)
    out = np.empty((n, f, f), bool)
    for i, (x, y) in enumerate(rel // int(stride)):
        out[i] = tissue[y : y + f, x : x + f] != 0
    return out


def feature_batches(store: str | Path, layer: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, features)`` of a store's ``layer``, one shard of tiles at a time."""
    from equislide.storage import open_features

    feats = open_features(store, layer, tiles_per_chunk=STREAM_TILES)
    for start in range(0, feats.shape[0], STREAM_TILES):
        yield start, np.asarray(feats[start : start + STREAM_TILES].compute(scheduler="synchronous"))


def sample_tissue_vectors(store: str | Path, layer: int, stride: int, sampler: Any) -> None:
    """Stream a store's masked tissue vectors of ``layer`` into ``sampler`` (under its sample ID)."""
    from equislide.models.kmeans import masked_vectors
    from equislide.storage import read_sample_meta

    sample_id = read_sample_meta(store)["sample_id"]
    masks = tile_feature_masks(store, stride)
    for start, feats in feature_batches(store, layer):
        sampler.add(sample_id, masked_vectors(feats, masks[start : start + len(feats)]))


def _draw_intact(path: Path) -> bool:
    """A saved draw parses as a 2-d float16 array (a damaged one is drawn again)."""
    try:
        drawn = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return drawn.ndim == 2 and drawn.dtype == np.float16


def draw_store_vectors(
    store: str | Path, out_dir: str | Path, *, layer: int, spec: ClusterSpec | None = None
) -> dict[str, Any]:
    """One sample's share of the cohort K-means' vectors, saved as ``draw-<key>.npy`` (float16).

    At most ``spec.per_sample`` tissue vectors, drawn by the sample's own seeded reservoir (seeded from
    ``spec.seed`` and the sample ID, as in :class:`~equislide.models.StratifiedSampler`), so each sample
    is drawn on its own (by the worker that just wrote its features) and the cohort fit only stacks
    files. Stored as float16 because the features are: the values are exact. Skipped when the file
    for these features and parameters exists.

    Returns:
        ``{"path", "status" ("written" | "skipped"), "n_vectors"}``.
    """
    from equislide.files import atomic_write_bytes
    from equislide.models.kmeans import StratifiedSampler
    from equislide.storage import features_key, params_hash, read_features_meta, store_identity

    spec = spec or ClusterSpec()
    key = params_hash(
        {
            "format": CLUSTER_FORMAT,
            "sample": store_identity(store),
            "features": features_key(store, layer),
            "per_sample": int(spec.per_sample),
            "seed": int(spec.seed),
        }
    )[:24]
    from equislide.storage.confine import confined

    path = confined(out_dir, Path(out_dir) / f"draw-{key}.npy")
    if _draw_intact(path):
        return {"path": str(path), "status": "skipped", "n_vectors": None}
    sampler = StratifiedSampler(spec.per_sample, seed=spec.seed)
    sample_tissue_vectors(store, layer, int(read_features_meta(store, layer)["stride"]), sampler)
    seen = any(sampler.n_seen(s) for s in sampler.sample_ids)
    vectors = sampler.sample if seen else np.empty((0, 0), np.float32)
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float16))
    atomic_write_bytes(path, buf.getvalue())
    return {"path": str(path), "status": "written", "n_vectors": int(len(vectors))}


def store_features_and_draw(
    store: str | Path,
    backbone: BackboneRef,
    spec: FeatureSpec | None = None,
    *,
    draws_dir: str | Path | None = None,
    cluster: ClusterSpec | None = None,
) -> dict[str, Any]:
    """:func:`extract_store_features`, then (with ``draws_dir``) :func:`draw_store_vectors`: the
    features stage of one sample in one call (a module-level callable: it runs in a budgeted child)."""
    res = extract_store_features(store, backbone, spec)
    if draws_dir is not None:
        draw_store_vectors(store, draws_dir, layer=backbone.layer, spec=cluster)
    return res

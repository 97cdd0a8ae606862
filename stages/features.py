"""The features stage: float16 features of every tile of a store, and its share of the K-means vectors.

:func:`extract_store_features` writes ``features/layer{L}`` beside the tiles, keyed by
:meth:`BackboneRef.key`, in shard-aligned tile ranges (:func:`feature_ranges`): a large sample's ranges
may run in several processes at once (:func:`extract_feature_range`), each filling the store's one
shared partial array (:func:`equislide.storage.open_feature_ranges`), and the call that finds every
range done publishes it (:func:`publish_features`). Then, for a cohort fit, :func:`draw_store_vectors`
draws the sample's share of the cohort K-means' vectors right away, on the same worker, so the fit only
stacks files.

Coordinates: feature maps are ``f_`` px (``stride`` analysis px each); tile coordinates in the
stores are the interiors' top-left corners in analysis px.
"""

from __future__ import annotations

import functools
import io
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equislide.specs import CLUSTER_FORMAT, BackboneRef, ClusterSpec, FeatureSpec

__all__ = [
    "DRAWS_DIR",
    "MAX_RANGES",
    "draw_store_vectors",
    "extract_feature_range",
    "extract_store_features",
    "feature_batches",
    "feature_ranges",
    "features_complete",
    "finished_feature_ranges",
    "publish_features",
    "sample_tissue_vectors",
    "store_features_and_draw",
    "store_share_and_draw",
    "tile_feature_masks",
]

#: Folder (under the models folder) of the per-sample vector draws of the cohort K-means.
DRAWS_DIR = "draws"
#: Tiles read per step when streaming features (one shard).
STREAM_TILES = 32


#: Ranges one sample's features are cut into at most (a whole slide: ranges of several shards).
MAX_RANGES = 256


def feature_ranges(store: str | Path, *, range_tiles: int | None = None) -> list[tuple[int, int]]:
    """The shard-aligned tile ranges ``[start, stop)`` a store's features are extracted in.

    Args:
        store: A finished tile store.
        range_tiles: Tiles per range, rounded up to whole feature shards
            (:func:`~equislide.storage.feature_shard_tiles`); default: one shard, or as many shards as
            keep a sample at :data:`MAX_RANGES` ranges or fewer.
    """
    from equislide.storage import feature_shard_tiles, read_sample_meta

    n = int(read_sample_meta(store)["n_tiles"])
    shard = feature_shard_tiles(n)
    if range_tiles is None:
        n_shards = math.ceil(n / shard)
        range_tiles = shard * max(1, math.ceil(n_shards / MAX_RANGES))
    elif range_tiles < 1:
        raise ValueError(f"range_tiles={range_tiles} must be >= 1")
    size = shard * math.ceil(int(range_tiles) / shard)
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def _open_writer(store: str | Path, backbone: BackboneRef, device: str):
    """The network and the store's shared partial feature array (created by the first caller)."""
    from equislide.stages.backbone import load_backbone
    from equislide.storage import open_feature_ranges, read_sample_meta

    meta = read_sample_meta(store)
    model, info = load_backbone(backbone, device)
    attrs = {
        **{k: info[k] for k in ("backbone", "stride", "normalisation", "weights", "model_config")},
        "halo_cropped": int(meta["halo"]),
        "weights_provenance": dict(backbone.provenance or {}),
        "precision": backbone.precision,
    }
    writer = open_feature_ranges(
        store,
        int(backbone.layer),
        channels=int(info["channels"]),
        f_tile=int(meta["tile"]) // int(info["stride"]),
        attrs=attrs,
        params=backbone.params(),
    )
    return model, info, meta, writer


def extract_feature_range(
    store: str | Path, backbone: BackboneRef, spec: FeatureSpec | None, start: int, stop: int
) -> dict[str, Any]:
    """Compute and store the features of tiles ``[start, stop)`` of ``store`` (a range of
    :func:`feature_ranges`) into its shared partial array, then mark the range done; several processes
    may fill different ranges of one store at once. Skipped when the range (or the whole array) is done.

    Forward passes never straddle a shard (batches start at each shard's first tile), so a tile's
    features do not depend on how the ranges were spread over processes.

    Returns:
        ``{"sample_id", "start", "stop", "status" ("written" | "skipped"), "n_tiles" (computed here),
        "seconds", "device"}``.
    """
    return _extract_ranges(store, backbone, spec, [(int(start), int(stop))])[0]


def _releasing_buffers(fn):
    """``fn``, after which the network's pooled layer outputs (models/_buffers.py) that served its
    batches go back to the system: other tasks on the worker do not find them held."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            from equislide.models import release_buffers

            release_buffers()

    return wrapper


@_releasing_buffers
def _extract_ranges(
    store: str | Path, backbone: BackboneRef, spec: FeatureSpec | None, ranges: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """:func:`extract_feature_range` of each range, with the network and the array opened once."""
    from equislide.models.extract import extract_features
    from equislide.stages.backbone import read_tiles
    from equislide.storage import done_feature_ranges, is_features_done, read_sample_meta
    from equislide.storage.ranges import covered

    spec = spec or FeatureSpec(backbone=backbone.backbone, layer=backbone.layer)
    layer, params = int(backbone.layer), backbone.params()
    sample_id = read_sample_meta(store)["sample_id"]

    def skipped(start: int, stop: int) -> dict[str, Any]:
        return {
            "sample_id": sample_id,
            "start": start,
            "stop": stop,
            "status": "skipped",
            "n_tiles": 0,
            "seconds": 0.0,
            "device": None,
        }

    if is_features_done(store, layer, params=params):
        return [skipped(a, b) for a, b in ranges]
    done = done_feature_ranges(store, layer, params=params)
    if all(covered(done, a, b) for a, b in ranges):
        return [skipped(a, b) for a, b in ranges]
    from equislide.storage import FeaturesPublished

    try:
        model, info, meta, writer = _open_writer(store, backbone, spec.device)
    except FeaturesPublished:  # published by another process since the check above
        return [skipped(a, b) for a, b in ranges]
    from equislide.models.accel import accelerate, choose_batch_tiles
    from equislide.models.prefetch import Prefetcher, prefetch_enabled

    halo, device = int(meta["halo"]), info["device"]
    side = int(meta["tile"]) + 2 * halo
    # On CUDA the batch comes from free memory; never past a shard (a forward never straddles one).
    batch = choose_batch_tiles(
        model, device, side=side, layer=layer, default=int(spec.batch_tiles), maximum=writer.shard_tiles
    )
    model = accelerate(model, device)
    out: dict[int, dict[str, Any]] = {}
    todo = [i for i, (a, b) in enumerate(ranges) if not writer.is_done(a, b)]
    out.update({i: skipped(*ranges[i]) for i in set(range(len(ranges))) - set(todo)})
    # Every shard of every range to do, in order: the next shard (also the next range's first) is read,
    # decoded and, on CUDA, sent to the device while this one runs forward.
    shards = [
        (i, s0, min(ranges[i][1], s0 + writer.shard_tiles))
        for i in todo
        for s0 in range(ranges[i][0], ranges[i][1], writer.shard_tiles)
    ]
    current, t0, skipping = -1, time.perf_counter(), False

    def finish(i: int) -> None:
        start, stop = ranges[i]
        writer.mark_done(start, stop)
        out[i] = {
            **skipped(start, stop),
            "status": "written",
            "n_tiles": int(stop - start),
            "seconds": round(time.perf_counter() - t0, 3),
            "device": device,
        }

    with Prefetcher(
        lambda shard: read_tiles(store, shard[1], shard[2]), shards, device=device, enabled=prefetch_enabled()
    ) as loaded:
        for (i, s0, s1), tiles in loaded:
            if i != current:
                if current >= 0:
                    if not skipping:
                        finish(current)
                    t0 = time.perf_counter()
                current = i
                skipping = writer.is_done(*ranges[i])  # done by another process meanwhile
                if skipping:
                    out[i] = skipped(*ranges[i])
            if skipping:
                continue
            parts = [
                extract_features(
                    model,
                    tiles[b : b + batch],
                    layer=layer,
                    halo=halo,
                    device=device,
                    precision=backbone.precision,
                )
                for b in range(0, s1 - s0, batch)
            ]
            writer.write(s0, np.concatenate(parts))  # a whole shard per write: no shard is shared
        if current >= 0 and not skipping:
            finish(current)
    return [out[i] for i in range(len(ranges))]


def finished_feature_ranges(store: str | Path, backbone: BackboneRef) -> list[tuple[int, int]]:
    """The ranges of ``store`` whose features are done: those marked done in the shared partial, or
    every range of :func:`feature_ranges` once the array is published."""
    from equislide.storage import done_feature_ranges, is_features_done

    layer, params = int(backbone.layer), backbone.params()
    if is_features_done(store, layer, params=params):
        return feature_ranges(store)
    return done_feature_ranges(store, layer, params=params)


def features_complete(store: str | Path, backbone: BackboneRef) -> bool:
    """Every tile's range is done (published or about to be)."""
    from equislide.storage import done_feature_ranges, is_features_done, read_sample_meta
    from equislide.storage.ranges import covered

    layer, params = int(backbone.layer), backbone.params()
    if is_features_done(store, layer, params=params):
        return True
    n = int(read_sample_meta(store)["n_tiles"])
    return covered(done_feature_ranges(store, layer, params=params), 0, n) if n else False


def publish_features(store: str | Path, backbone: BackboneRef, spec: FeatureSpec | None = None) -> dict:
    """Publish a store's features once every range is done (skipped when they are published).

    Returns:
        ``{"sample_id", "status" ("published" | "skipped"), "path"}``.

    Raises:
        IncompleteSampleError: Some ranges are not done; the message names their tiles.
    """
    from equislide.storage import (
        features_path,
        is_features_done,
        publish_feature_ranges,
        read_sample_meta,
    )

    meta = read_sample_meta(store)
    layer, params = int(backbone.layer), backbone.params()
    out = {"sample_id": meta["sample_id"]}
    if is_features_done(store, layer, params=params):
        return {**out, "status": "skipped", "path": str(features_path(store, layer))}
    if int(meta["n_tiles"]) == 0:  # no range to create the array: create it empty here
        spec = spec or FeatureSpec(backbone=backbone.backbone, layer=backbone.layer)
        _open_writer(store, backbone, spec.device)
    return {**out, "status": "published", "path": str(publish_feature_ranges(store, layer, params=params))}


def extract_store_features(
    store: str | Path,
    backbone: BackboneRef,
    spec: FeatureSpec | None = None,
    *,
    ranges: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Compute and store float16 features of ``store``'s tiles (skipped when already done): its
    ``ranges`` (default: every range of :func:`feature_ranges`, in one process), then publish them
    when every range of the store is done (by this call or by others).

    Args:
        store: A finished tile store.
        backbone: What :func:`~equislide.stages.backbone.calibrated_backbone` returned.
        spec: Device and batch size (``spec.device``, ``spec.batch_tiles``); the network is ``backbone``.
        ranges: Some ranges of :func:`feature_ranges` (a share of a large sample).

    Returns:
        ``{"sample_id", "status" ("written" | "skipped"), "n_tiles" (of the store), "tiles_done"
        (computed by this call), "seconds" (the sum of its ranges'), "device", "ranges" (each range's
        result), "published" (this call found the store complete)}``.
    """
    from equislide.storage import read_sample_meta

    meta = read_sample_meta(store)
    todo = feature_ranges(store) if ranges is None else [(int(a), int(b)) for a, b in ranges]
    results = _extract_ranges(store, backbone, spec, todo)
    complete = features_complete(store, backbone) or int(meta["n_tiles"]) == 0
    if complete:
        publish_features(store, backbone, spec)
    written = [r for r in results if r["status"] == "written"]
    return {
        "sample_id": meta["sample_id"],
        "status": "written" if written else "skipped",
        "n_tiles": int(meta["n_tiles"]),
        "tiles_done": sum(r["n_tiles"] for r in results),
        "seconds": round(sum(r["seconds"] for r in results), 3),
        "device": written[0]["device"] if written else None,
        "ranges": [{k: r[k] for k in ("start", "stop", "status", "seconds")} for r in results],
        "published": complete,
    }


def tile_feature_masks(store: str | Path, stride: int, *, xp: Any = np) -> Any:
    """Boolean tissue masks of every tile interior at feature resolution, ``(n_tiles, f, f)``.

    The store's thumbnail tissue mask is sampled at the centre of each feature pixel (as
    :func:`equislide.storage.stitch_labels` does), so the masks match the stitched label map.

    Args:
        store: A finished tile store.
        stride: Analysis px per feature px.
        xp: numpy (default) or cupy (:func:`equislide.arrays.array_module`): the module the masks are
            built with, so they are on the device where the features are masked.
    """
    import zarr

    from equislide.storage import read_sample_meta, stitch_labels

    meta = read_sample_meta(store)
    group = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
    coords = np.asarray(group["coords"][:])
    f = int(meta["tile"]) // int(stride)
    n = len(coords)
    if n == 0:
        return xp.zeros((0, f, f), bool)
    origin = coords.min(0)
    rel = coords - origin
    ones = xp.zeros((n, f, f), np.int64)
    kwargs: dict[str, Any] = {}
    if "tissue_mask" in group:
        kwargs = {
            "tissue_mask": xp.asarray(group["tissue_mask"][:]),
            "mask_downsample": float(group["tissue_mask"].attrs["downsample"]),
            "mask_origin": tuple(meta.get("tissue_mask_l_origin") or (0.0, 0.0)),
        }
    tissue = stitch_labels(ones, coords, stride=int(stride), l_origin=tuple(int(v) for v in origin), **kwargs)
    out = xp.empty((n, f, f), bool)
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
    ranges: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """:func:`extract_store_features` (of ``ranges``, default all), then (with ``draws_dir``) once the
    features are published :func:`draw_store_vectors`: the features stage of one sample, or of one
    share of a large sample, in one call (a module-level callable: it runs in a budgeted child).
    Whichever share completes the sample publishes and draws; no cohort-wide barrier waits for it."""
    res = extract_store_features(store, backbone, spec, ranges=ranges)
    if draws_dir is not None and res["published"]:
        draw_store_vectors(store, draws_dir, layer=backbone.layer, spec=cluster)
    return res


def store_share_and_draw(
    share: tuple[str | Path, list[tuple[int, int]] | None],
    backbone: BackboneRef,
    spec: FeatureSpec | None = None,
    *,
    draws_dir: str | Path | None = None,
    cluster: ClusterSpec | None = None,
) -> dict[str, Any]:
    """:func:`store_features_and_draw` of one work unit's share ``(store, ranges)`` (ranges None: the
    whole store), as the flow's feature tasks pass it (one picklable argument)."""
    store, ranges = share
    return store_features_and_draw(
        store, backbone, spec, draws_dir=draws_dir, cluster=cluster, ranges=ranges
    )

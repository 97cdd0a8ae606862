"""From tile stores to cluster maps: the per-sample stages the cohort flow runs, one call each.

Each function here is one stage of ``equislide segment`` applied to finished tile stores (written by
:func:`equislide.tiling.tile_slide`); the Prefect flow in ``flows/cohort.py`` only wires them:

1. :func:`calibrated_backbone`: the backbone every worker will load. Given weights, they are used as
   they are; without, a seeded random initialisation has its BatchNorm recalibrated on a deterministic
   choice of the cohort's tiles and is saved (safetensors + JSON) under the run folder, so every worker
   (and a resumed run) loads the very same network.
2. :func:`extract_store_features`: features of every tile of one store, float16, beside the tiles
   (:func:`equislide.storage.open_features_for_write`). The network is loaded once per process and
   kept in a module-level cache keyed by ``(backbone, weights sha256, layer, device)``.
3. :func:`fit_cohort_stores`: one K-means for all samples, fitted on a stratified sample of masked,
   L2-normalised feature vectors (at most ``per_sample`` per sample), each sample's share drawn by
   :func:`draw_store_vectors` right after its features, in parallel.
4. :func:`segment_store`: predict (fitting per sample first in the paper's mode), stitch the label map
   and write the viewable outputs: OME-Zarr (image + ``labels/clusters`` + ``labels/tissue``), an
   overlay PNG and a QuPath GeoJSON.

Every stage is resumable: a finished result (the features' done-marker, a saved model, a sample's
``.segment.json``) made from the same inputs and parameters is reused, never recomputed, so a rerun
over the same folder gives byte-identical files. This module imports :mod:`equislide.storage` (data
flows from the stores into the models and back into storage); it has no Dask or Prefect.

Coordinates: feature maps are ``f_`` px (``stride`` analysis px each); tile coordinates in the
stores are the interiors' top-left corners in analysis px ``(l_x, l_y)``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PIPELINE_FORMAT",
    "SEGMENT_MARKER_SUFFIX",
    "calibrated_backbone",
    "DRAWS_DIR",
    "clear_backbone_cache",
    "draw_store_vectors",
    "extract_store_features",
    "feature_params",
    "fit_cohort_stores",
    "segment_store",
    "tile_feature_masks",
]

#: Version tag of this pipeline's parameters; part of every key it writes.
PIPELINE_FORMAT = "equislide-segment/1"
#: A sample's outputs are finished when ``<out>/<sample_id>.segment.json`` exists with the same key.
SEGMENT_MARKER_SUFFIX = ".segment.json"
#: Longest side of an overlay PNG, px: drawn from the tiles at the finest resolution that fits.
OVERLAY_MAX = 2048
#: Folder (under the models folder) of the per-sample vector draws of the cohort K-means.
DRAWS_DIR = "draws"
#: Tiles per forward pass.
_BATCH = 4
#: Tiles read per step when streaming features (one shard).
_STREAM = 32

_BACKBONES: dict[tuple[str, str, int, str], Any] = {}


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_json(path: Path, doc: Mapping[str, Any]) -> None:
    _atomic_bytes(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _store_key(store: str | Path) -> dict[str, Any]:
    """The identity of a finished tile store: its sample ID and the hashes of its done-marker."""
    from equislide.storage import DONE_MARKER

    done = _read_json(Path(store) / DONE_MARKER) or {}
    return {
        "sample_id": done.get("sample_id"),
        "input_sha256": done.get("input_sha256"),
        "params_sha256": done.get("params_sha256"),
    }


def _read_tiles(store: str | Path, start: int, stop: int) -> np.ndarray:
    from equislide.storage import open_tiles

    return np.asarray(open_tiles(store)[start:stop].compute(scheduler="synchronous"))


def calibrated_backbone(
    stores: Sequence[str | Path],
    out_dir: str | Path,
    *,
    backbone: str = "srenet18",
    layer: int = 4,
    weights: str | Path | None = None,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    calibration_tiles: int = 16,
) -> dict[str, Any]:
    """The backbone checkpoint every feature task loads, and how it was made.

    Args:
        stores: Finished tile stores of the cohort (the calibration tiles come from them).
        out_dir: Folder for a calibrated random initialisation (``backbone-<key>.safetensors``).
        backbone: Registered model name.
        layer: Feature stage 1-4 (BatchNorms after it are left alone).
        weights: A checkpoint to use as is; None = seeded random weights, BatchNorm recalibrated.
        seed: Seed of the random initialisation.
        model_kwargs: Builder arguments of a random initialisation (e.g. ``{"width": 16}``).
        calibration_tiles: Most tiles used to recalibrate: taken round-robin over the stores sorted by
            sample ID, evenly spaced within each store, so the choice depends only on the stores.

    Returns:
        ``{"path", "sha256", "backbone", "layer", "weights_random", "provenance", "status"}``;
        ``status`` is ``"given"``, ``"written"`` or ``"skipped"`` (reused from an earlier run).
    """
    from equislide.models.checkpoint import save_checkpoint
    from equislide.models.extract import prepare_backbone
    from equislide.storage import params_hash, read_sample_meta, sha256_file

    if weights is not None:
        path = Path(weights)
        path = path.with_suffix(".safetensors") if path.suffix == ".json" else path
        return {
            "path": str(path),
            "sha256": sha256_file(path),
            "backbone": backbone,
            "layer": int(layer),
            "weights_random": False,
            "provenance": {"weights": str(path)},
            "status": "given",
        }
    if calibration_tiles < 1:
        raise ValueError(f"calibration_tiles={calibration_tiles} must be >= 1")
    metas = sorted(((read_sample_meta(s), Path(s)) for s in stores), key=lambda m: m[0]["sample_id"])
    if not metas:
        raise ValueError("no finished tile store to calibrate BatchNorm on; tiling gave no sample")
    # Round-robin over samples, evenly spaced tiles within each: deterministic in the stores alone.
    per_store = max(1, -(-calibration_tiles // len(metas)))
    picks: list[tuple[Path, int]] = []
    for rank in range(per_store):
        for meta, store in metas:
            n = int(meta["n_tiles"])
            if rank < n and len(picks) < calibration_tiles:
                picks.append((store, (rank * n) // min(n, per_store)))
    sides = {int(m["tile_with_halo"]) for m, _ in metas}
    provenance = {
        "format": PIPELINE_FORMAT,
        "init": f"random(seed={seed})",
        "backbone": backbone,
        "layer": int(layer),
        "model_kwargs": dict(model_kwargs or {}),
        "batchnorm": "recalibrated on the cohort's tiles",
        "calibration": [{**_store_key(s), "tile": int(i)} for s, i in picks],
    }
    key = params_hash(provenance)[:16]
    path = Path(out_dir) / f"backbone-{key}.safetensors"
    info = {
        "path": str(path),
        "backbone": backbone,
        "layer": int(layer),
        "weights_random": True,
        "provenance": provenance,
    }
    if path.is_file() and path.with_suffix(".json").is_file():
        return {**info, "sha256": sha256_file(path), "status": "skipped"}
    # Tiles of different sides (TMA cores of several slides) are calibrated in separate batches.
    tiles = [_read_tiles(s, i, i + 1) for s, i in picks]
    batches = [np.concatenate([t for t in tiles if t.shape[1] == side]) for side in sorted(sides)]
    batches = [b for b in batches if len(b)]
    model, _ = prepare_backbone(
        backbone,
        layer=layer,
        calibration_tiles=batches,
        seed=seed,
        device="cpu",
        model_kwargs=dict(model_kwargs or {}),
    )
    tmp_dir = Path(out_dir) / f".backbone-{key}.partial-{uuid.uuid4().hex[:12]}"
    try:
        save_checkpoint(model, tmp_dir / path.name, provenance=provenance)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir / path.with_suffix(".json").name, path.with_suffix(".json"))
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {**info, "sha256": sha256_file(path), "status": "written"}


def _cached_backbone(name: str, path: str, sha256: str, layer: int, device: str):
    """Load a checkpoint once per process; later calls with the same key reuse it."""
    from equislide.models.extract import prepare_backbone, resolve_device

    dev = str(resolve_device(device))
    key = (name, sha256, int(layer), dev)
    if key not in _BACKBONES:
        model, info = prepare_backbone(name, weights=path, layer=layer, device=dev)
        if info["weights_sha256"] != sha256:
            raise ValueError(f"{path} has sha256 {info['weights_sha256']}, expected {sha256}; it changed")
        _BACKBONES[key] = (model, info)
    return _BACKBONES[key]


def clear_backbone_cache() -> None:
    """Forget every cached network (tests; or to free memory in a long-lived worker)."""
    _BACKBONES.clear()


def feature_params(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter dict keying a store's features: network, weights hash, layer, normalisation."""
    from equislide.models.extract import NORMALISATION

    return {
        "format": PIPELINE_FORMAT,
        "backbone": backbone["backbone"],
        "weights_sha256": backbone["sha256"],
        "layer": int(backbone["layer"]),
        "normalisation": dict(NORMALISATION),
    }


def extract_store_features(
    store: str | Path, backbone: Mapping[str, Any], *, device: str = "auto", batch_tiles: int = _BATCH
) -> dict[str, Any]:
    """Compute and store float16 features of every tile of ``store`` (skipped when already done).

    Args:
        store: A finished tile store.
        backbone: What :func:`calibrated_backbone` returned.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...
        batch_tiles: Tiles per forward pass.

    Returns:
        ``{"sample_id", "status" ("written" | "skipped"), "n_tiles", "seconds", "device"}``.
    """
    from equislide.storage import is_features_done, open_features_for_write, read_sample_meta

    t0 = time.perf_counter()
    meta = read_sample_meta(store)
    layer = int(backbone["layer"])
    params = feature_params(backbone)
    out = {"sample_id": meta["sample_id"], "n_tiles": int(meta["n_tiles"])}
    if is_features_done(store, layer, params=params):
        return {**out, "status": "skipped", "seconds": 0.0, "device": None}
    model, info = _cached_backbone(backbone["backbone"], backbone["path"], backbone["sha256"], layer, device)
    from equislide.models.extract import extract_features

    attrs = {
        **{k: info[k] for k in ("backbone", "stride", "normalisation", "weights", "model_config")},
        "halo_cropped": int(meta["halo"]),
        "weights_provenance": dict(backbone.get("provenance") or {}),
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
        for start in range(0, n, batch_tiles):
            tiles = _read_tiles(store, start, min(n, start + batch_tiles))
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


def _feature_batches(store: str | Path, layer: int) -> Iterator[tuple[int, np.ndarray]]:
    from equislide.storage import open_features

    feats = open_features(store, layer, tiles_per_chunk=_STREAM)
    for start in range(0, feats.shape[0], _STREAM):
        yield start, np.asarray(feats[start : start + _STREAM].compute(scheduler="synchronous"))


def _kmeans_params(k: int, backend: str, seed: int):
    from equislide.models.kmeans import KMeansParams

    return KMeansParams(k=int(k), backend=backend, seed=int(seed), l2_normalise=True, device="cpu")


def _sample_tissue_vectors(store: str | Path, layer: int, stride: int, sampler: Any) -> None:
    from equislide.models.kmeans import masked_vectors
    from equislide.storage import read_sample_meta

    sample_id = read_sample_meta(store)["sample_id"]
    masks = tile_feature_masks(store, stride)
    for start, feats in _feature_batches(store, layer):
        sampler.add(sample_id, masked_vectors(feats, masks[start : start + len(feats)]))


def _features_hash(store: str | Path, layer: int) -> str | None:
    from equislide.storage import FEATURES_DONE_MARKER, features_path

    return (_read_json(features_path(store, layer) / FEATURES_DONE_MARKER) or {}).get("params_sha256")


def draw_store_vectors(
    store: str | Path, out_dir: str | Path, *, layer: int, per_sample: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """One sample's share of the cohort K-means' vectors, saved as ``draw-<key>.npy`` (float16).

    At most ``per_sample`` tissue vectors, drawn by the sample's own seeded reservoir (seeded from
    ``seed`` and the sample ID, as in :class:`~equislide.models.StratifiedSampler`), so each sample is
    drawn on its own (by the worker that just wrote its features) and the cohort fit only stacks
    files. Stored as float16 because the features are: the values are exact. Skipped when the file
    for these features and parameters exists.

    Returns:
        ``{"path", "status" ("written" | "skipped"), "n_vectors"}``.
    """
    from equislide.models.kmeans import StratifiedSampler
    from equislide.storage import params_hash, read_features_meta

    key = params_hash(
        {
            "format": PIPELINE_FORMAT,
            "sample": _store_key(store),
            "features": _features_hash(store, layer),
            "per_sample": int(per_sample),
            "seed": int(seed),
        }
    )[:24]
    path = Path(out_dir) / f"draw-{key}.npy"
    if path.is_file():
        return {"path": str(path), "status": "skipped", "n_vectors": None}
    sampler = StratifiedSampler(per_sample, seed=seed)
    _sample_tissue_vectors(store, layer, int(read_features_meta(store, layer)["stride"]), sampler)
    seen = any(sampler.n_seen(s) for s in sampler.sample_ids)
    vectors = sampler.sample if seen else np.empty((0, 0), np.float32)
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float16))
    _atomic_bytes(path, buf.getvalue())
    return {"path": str(path), "status": "written", "n_vectors": int(len(vectors))}


def fit_cohort_stores(
    stores: Sequence[str | Path],
    out_dir: str | Path,
    *,
    layer: int,
    k: int = 3,
    per_sample: int = 2000,
    backend: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """One K-means model for the cohort, from at most ``per_sample`` tissue vectors of each store.

    Vectors are streamed one shard of tiles at a time into a
    :class:`~equislide.models.StratifiedSampler` (seeded), L2-normalised, and fitted with
    :func:`~equislide.models.fit_kmeans`. The model is saved as ``kmeans-<key>.safetensors`` under
    ``out_dir``, the key hashing the stores' features and the K-means parameters; an existing one is
    reused.

    Returns:
        ``{"path", "sha256", "status" ("written" | "skipped"), "backend", "n_vectors", "samples"}``.
    """
    from equislide.models.kmeans import fit_kmeans
    from equislide.storage import params_hash, sha256_file

    stores = sorted((Path(s) for s in stores), key=lambda s: str(_store_key(s)["sample_id"]))
    if not stores:
        raise ValueError("no sample with features to fit K-means on")
    params = _kmeans_params(k, backend, seed)
    identity = {
        "format": PIPELINE_FORMAT,
        "mode": "cohort",
        "k": int(k),
        "per_sample": int(per_sample),
        "seed": int(seed),
        "backend": backend,
        "features": [{**_store_key(s), "features": _features_hash(s, layer)} for s in stores],
    }
    key = params_hash(identity)[:16]
    path = Path(out_dir) / f"kmeans-cohort-{key}.safetensors"
    if path.is_file() and path.with_suffix(".json").is_file():
        doc = _read_json(path.with_suffix(".json")) or {}
        return {
            "path": str(path),
            "sha256": sha256_file(path),
            "status": "skipped",
            "backend": doc.get("backend"),
            "n_vectors": doc.get("n_vectors"),
            "samples": len(stores),
        }
    parts = []
    for store in stores:  # each sample's draw, as the feature tasks left it (or drawn now)
        drawn = draw_store_vectors(
            store, Path(out_dir) / DRAWS_DIR, layer=layer, per_sample=per_sample, seed=seed
        )
        vectors = np.load(drawn["path"]).astype(np.float32)
        if vectors.size:
            parts.append(vectors)
    model = fit_kmeans(np.concatenate(parts) if parts else np.empty((0, 0), np.float32), params=params)
    model.save(path, provenance=identity)
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "status": "written",
        "backend": model.backend,
        "n_vectors": int(model.n_vectors),
        "samples": len(stores),
    }


def _clip_to_slide(geojson: dict[str, Any], l0_size: Sequence[int] | None) -> dict[str, Any]:
    """Clamp every vertex into the slide's level-0 rectangle ``[0, width] x [0, height]``.

    The label map covers whole feature pixels, so the last row and column reach up to one feature
    pixel past the slide's edge; QuPath rejects (or misplaces) annotations outside the image. The
    vertices lie on the feature-pixel grid and the overhang is under one pixel, so clamping moves only
    the outermost grid line onto the edge and keeps every polygon's shape valid.
    """
    if not l0_size:
        return geojson
    upper = np.asarray([float(l0_size[0]), float(l0_size[1])])

    def clamp(node: Any) -> Any:
        if isinstance(node, list) and node and isinstance(node[0], (int, float)):
            return [float(min(max(v, 0.0), hi)) for v, hi in zip(node, upper, strict=False)]
        return [clamp(n) for n in node] if isinstance(node, list) else node

    for feature in geojson.get("features", []):
        geometry = feature["geometry"]
        geometry["coordinates"] = clamp(geometry["coordinates"])
    return geojson


def segment_store(
    store: str | Path,
    out_dir: str | Path,
    *,
    layer: int,
    kmeans: Mapping[str, Any] | None = None,
    k: int = 3,
    per_sample: int = 2000,
    backend: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Label map and viewable outputs of one sample (skipped when already written with the same key).

    Args:
        store: A finished tile store with features of ``layer``.
        out_dir: Output folder; writes ``<sample_id>.ome.zarr``, ``<sample_id>.png``,
            ``<sample_id>.geojson`` and the marker ``<sample_id>.segment.json`` (written last).
        layer: Feature stage.
        kmeans: The cohort model (:func:`fit_cohort_stores`' result); None = fit this sample alone on
            up to ``per_sample`` of its tissue vectors (the paper's protocol: 2000 vectors, k = 3),
            saved as ``<sample_id>.kmeans.safetensors``.
        k, per_sample, backend, seed: The per-sample fit's parameters.

    Returns:
        ``{"sample_id", "status", "outputs" {name: path}, "label_counts" {value: px}, "shape",
        "pixel_size_um", "seconds"}``.
    """
    from equislide.models.kmeans import KMeansModel, StratifiedSampler, fit_kmeans
    from equislide.storage import (
        labels_to_geojson,
        params_hash,
        read_features_meta,
        read_sample_meta,
        sha256_file,
        stitch_store,
        write_geojson,
        write_ome_zarr,
        write_overlay_png,
    )

    t0 = time.perf_counter()
    meta = read_sample_meta(store)
    sample_id = meta["sample_id"]
    out_dir = Path(out_dir)
    base = out_dir / sample_id
    marker_path = base.with_name(base.name + SEGMENT_MARKER_SUFFIX)
    fmeta = read_features_meta(store, layer)
    stride = int(fmeta["stride"])
    identity = {
        "format": PIPELINE_FORMAT,
        "sample": _store_key(store),
        "features": fmeta["params_sha256"],
        "kmeans": {"mode": "cohort", "sha256": kmeans["sha256"]}
        if kmeans is not None
        else {
            "mode": "per-sample",
            "k": int(k),
            "per_sample": int(per_sample),
            "backend": backend,
            "seed": seed,
        },
    }
    key = params_hash(identity)
    marker = _read_json(marker_path)
    if marker is not None and marker.get("key") == key:
        result = dict(marker["result"])
        result["outputs"] = {k: os.path.normpath(out_dir / v) for k, v in result["outputs"].items()}
        return {**result, "status": "skipped", "seconds": 0.0}

    if kmeans is not None:
        model = KMeansModel.load(kmeans["path"])
        model_path = kmeans["path"]
    else:
        sampler = StratifiedSampler(per_sample, seed=seed)
        _sample_tissue_vectors(store, layer, stride, sampler)
        model = fit_kmeans(sampler.sample, params=_kmeans_params(k, backend, seed))
        model_path = str(base.with_name(base.name + ".kmeans.safetensors"))
        model.save(model_path, provenance=identity)
    tile_labels = np.zeros((int(meta["n_tiles"]), int(fmeta["f_tile"]), int(fmeta["f_tile"])), np.uint16)
    for start, feats in _feature_batches(store, layer):
        tile_labels[start : start + len(feats)] = model.predict(feats)
    stitched = stitch_store(store, tile_labels, stride=stride, overlay_max=OVERLAY_MAX)
    labels, tissue, image = stitched["labels"], stitched["tissue"], stitched["image"]
    pixel_size = stitched["pixel_size_um"]
    names = {v + 1: f"cluster {v + 1}" for v in range(model.k)}
    outputs = {
        "ome_zarr": str(base.with_name(base.name + ".ome.zarr")),
        "overlay_png": str(base.with_name(base.name + ".png")),
        "geojson": str(base.with_name(base.name + ".geojson")),
        "kmeans": model_path,
    }
    base.parent.mkdir(parents=True, exist_ok=True)
    write_ome_zarr(
        outputs["ome_zarr"],
        image,
        pixel_size_um=pixel_size if pixel_size else float(stride),
        labels={"clusters": labels, "tissue": tissue},
        label_names={"clusters": names},
        name=sample_id,
    )
    write_overlay_png(outputs["overlay_png"], stitched["overlay_image"], labels, names=names, title=sample_id)
    geojson = labels_to_geojson(
        labels,
        stride=stride,
        l0_per_l=stitched["l0_per_l"],
        l0_offset=stitched["l0_origin"],
        names=names,
    )
    write_geojson(outputs["geojson"], _clip_to_slide(geojson, meta.get("source_dimensions")))
    values, counts = np.unique(labels, return_counts=True)
    result = {
        "sample_id": sample_id,
        "outputs": outputs,
        "label_counts": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        "shape": [int(v) for v in labels.shape],
        "stride": stride,
        "pixel_size_um": pixel_size,
        "kmeans_sha256": sha256_file(model_path),
        "warnings": list(meta.get("warnings") or []),
    }
    # The marker names files relative to out_dir, so two runs in different folders write the same bytes.
    stored = {**result, "outputs": {k: os.path.relpath(v, out_dir) for k, v in outputs.items()}}
    _atomic_json(marker_path, {"format": PIPELINE_FORMAT, "key": key, "identity": identity, "result": stored})
    return {**result, "status": "written", "seconds": round(time.perf_counter() - t0, 3)}

"""The segment stage: a sample's label map and its viewable outputs.

:func:`segment_store` predicts every tile's clusters (with the cohort model, or fitting the sample
alone first in the paper's mode), stitches the label map, and writes OME-Zarr (image +
``labels/clusters`` + ``labels/tissue``), an overlay PNG and a QuPath GeoJSON, then the done-marker
``<sample>.segment.json`` (last). A marker with the same key means the sample is finished.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equislide.specs import CLUSTER_FORMAT, ClusterSpec, KMeansRef

__all__ = ["OVERLAY_MAX", "SEGMENT_MARKER_SUFFIX", "clip_to_slide", "outputs_present", "segment_store"]

#: A sample's outputs are finished when ``<out>/<sample_id>.segment.json`` exists with the same key.
SEGMENT_MARKER_SUFFIX = ".segment.json"
#: Longest side of an overlay PNG, px: drawn from the tiles at the finest resolution that fits.
OVERLAY_MAX = 2048


def clip_to_slide(geojson: dict[str, Any], l0_size: Sequence[int] | None) -> dict[str, Any]:
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


def outputs_present(outputs: dict[str, str]) -> bool:
    """Every output a segment marker names is there: files non-empty, the OME-Zarr with its metadata."""
    for path in map(Path, outputs.values()):
        if path.suffix == ".zarr":  # OME-NGFF 0.4 is zarr v2 (.zgroup); accept v3 (zarr.json) too
            for group in (path, path / "labels" / "clusters"):
                if not ((group / ".zgroup").is_file() or (group / "zarr.json").is_file()):
                    return False
        elif not (path.is_file() and path.stat().st_size > 0):
            return False
    return True


def segment_store(
    store: str | Path,
    out_dir: str | Path,
    *,
    layer: int,
    spec: ClusterSpec | None = None,
    kmeans: KMeansRef | None = None,
) -> dict[str, Any]:
    """Label map and viewable outputs of one sample (skipped when already written with the same key).

    Args:
        store: A finished tile store with features of ``layer``.
        out_dir: Output folder; writes ``<sample_id>.ome.zarr``, ``<sample_id>.png``,
            ``<sample_id>.geojson`` and the marker ``<sample_id>.segment.json`` (written last).
        layer: Feature stage.
        spec: The clustering. With ``kmeans`` None, this sample is fitted alone (the paper's protocol:
            2000 vectors, k = 3), saved as ``<sample_id>.kmeans.safetensors``.
        kmeans: The cohort model (:func:`~equislide.stages.cluster.fit_cohort_stores`' result).

    Returns:
        ``{"sample_id", "status", "outputs" {name: path}, "label_counts" {value: px}, "shape",
        "pixel_size_um", "seconds"}``.
    """
    from equislide.files import atomic_write_json, read_json, sha256_file
    from equislide.models.kmeans import KMeansModel
    from equislide.stages.cluster import fit_store
    from equislide.stages.features import feature_batches
    from equislide.storage import (
        labels_to_geojson,
        params_hash,
        read_features_meta,
        read_sample_meta,
        stitch_store,
        store_identity,
        write_geojson,
        write_ome_zarr,
        write_overlay_png,
    )

    spec = spec or ClusterSpec()
    t0 = time.perf_counter()
    meta = read_sample_meta(store)
    sample_id = meta["sample_id"]
    out_dir = Path(out_dir)
    base = out_dir / sample_id
    marker_path = base.with_name(base.name + SEGMENT_MARKER_SUFFIX)
    fmeta = read_features_meta(store, layer)
    stride = int(fmeta["stride"])
    identity = {
        "format": CLUSTER_FORMAT,
        "sample": store_identity(store),
        "features": fmeta["params_sha256"],
        "kmeans": {"mode": "cohort", "sha256": kmeans.sha256} if kmeans is not None else spec.params(),
    }
    key = params_hash(identity)
    marker = read_json(marker_path)
    if marker is not None and marker.get("key") == key:
        result = dict(marker["result"])
        result["outputs"] = {k: os.path.normpath(out_dir / v) for k, v in result["outputs"].items()}
        if outputs_present(result["outputs"]):
            return {**result, "status": "skipped", "seconds": 0.0}
        # The marker vouches for outputs that are gone (deleted, or a concurrent run): write them again.

    if kmeans is not None:
        model = KMeansModel.load(kmeans.path)
        model_path = kmeans.path
    else:
        model = fit_store(store, layer=layer, stride=stride, spec=spec)
        model_path = str(base.with_name(base.name + ".kmeans.safetensors"))
        model.save(model_path, provenance=identity)
    tile_labels = np.zeros((int(meta["n_tiles"]), int(fmeta["f_tile"]), int(fmeta["f_tile"])), np.uint16)
    for start, feats in feature_batches(store, layer):
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
    write_geojson(outputs["geojson"], clip_to_slide(geojson, meta.get("source_dimensions")))
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
    marker_doc = {"format": CLUSTER_FORMAT, "key": key, "identity": identity, "result": stored}
    atomic_write_json(marker_path, marker_doc)
    return {**result, "status": "written", "seconds": round(time.perf_counter() - t0, 3)}

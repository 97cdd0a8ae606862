"""The segment stage: a sample's label map and its viewable outputs.

:func:`segment_store` predicts every tile's clusters (with the cohort model, or fitting the sample
alone first in the paper's mode), stitches the label map, and writes OME-Zarr (image +
``labels/clusters`` + ``labels/tissue``), an overlay PNG and a QuPath GeoJSON, then the done-marker
``<sample>.segment.json`` (last). A marker with the same key means the sample is finished.

A TMA slide also gets its dearrayed grid as QuPath ``tmaCore`` objects, ``<slide>.tma.geojson``
(:func:`write_tma_geojson`, once the slide's cores are tiled; :func:`tma_slides` groups the stores).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equislide.specs import CLUSTER_FORMAT, ClusterSpec, KMeansRef

__all__ = [
    "OVERLAY_MAX",
    "SEGMENT_MARKER_SUFFIX",
    "TMA_GEOJSON_SUFFIX",
    "clip_to_slide",
    "outputs_present",
    "overlay_picture",
    "segment_store",
    "tma_slides",
    "write_sample_ome_zarr",
    "write_sample_overlay",
    "write_tma_geojson",
]

#: A sample's outputs are finished when ``<out>/<sample_id>.segment.json`` exists with the same key.
SEGMENT_MARKER_SUFFIX = ".segment.json"
#: Longest side of an overlay PNG, px: drawn from the tiles at the finest resolution that fits.
OVERLAY_MAX = 2048
#: A TMA slide's cores as QuPath ``tmaCore`` objects: ``<out>/<slide sample ID>.tma.geojson``.
TMA_GEOJSON_SUFFIX = ".tma.geojson"
#: What the outputs look like; part of the marker's key, so a rerun over an older run rewrites them.
OUTPUTS_FORMAT = (
    "ome-ngff-0.5 analysis-plane pyramid; overlay over the slide with legend and scale bar; "
    "geojson from rasterio polygons with uuid ids"
)


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


def write_sample_ome_zarr(
    path: str | Path,
    store: str | Path,
    meta: dict[str, Any],
    stitched: dict[str, Any],
    *,
    stride: int,
    names: dict[int, str],
    ngff_version: str | None = None,
    **options: Any,
) -> Path:
    """The sample's OME-Zarr: its analysis plane from the tile store as a pyramid, labels on it.

    The image is the tile interiors' extent cut to the slide (:func:`~equislide.storage.tile_plane`),
    streamed a band at a time; the label maps (feature resolution, ``stitched`` from
    :func:`~equislide.storage.stitch_store`) are sampled onto every level (nearest). A translation
    places the sample where it lies on its slide (a TMA core at its core, a slide's cut grid at its
    first pixel), and ``attrs["equislide"]`` gives the level-0 offset. ``options`` go to
    :func:`~equislide.storage.write_ome_zarr` (``min_side``, ``chunk``).
    """
    from equislide.storage import NGFF_VERSION, tile_plane, write_ome_zarr

    plane = tile_plane(store)
    mpp = meta.get("mpp")
    px = float(mpp) if mpp else 1.0  # no resolution: analysis px are level-0 px, scaled 1 "µm"
    l0_per_l = stitched["l0_per_l"]
    lx, ly = plane.l_origin
    gx, gy = stitched["l_origin"]
    attributes = {
        "sample_id": meta["sample_id"],
        "kind": meta.get("kind"),
        "analysis_mpp": mpp,
        "l_origin": [lx, ly],
        "l0_origin": [lx * l0_per_l[0], ly * l0_per_l[1]],
        "l0_per_l": list(l0_per_l),
        "source_dimensions": meta.get("source_dimensions"),
        "label_grid": {"stride": stride, "l_origin": [gx, gy]},
        "note": "l_: analysis px, l0_: slide level-0 px of level 0's pixel (0, 0) corner",
    }
    return write_ome_zarr(
        path,
        plane,
        pixel_size_um=px,
        labels={"clusters": stitched["labels"], "tissue": stitched["tissue"]},
        label_upsample=stride,
        label_offset=(lx - gx, ly - gy),
        label_names={"clusters": names},
        name=meta["sample_id"],
        translation_um=(lx * px, ly * px),
        attributes=attributes,
        ngff_version=ngff_version or NGFF_VERSION,
        **options,
    )


def write_sample_overlay(
    path: str | Path,
    store: str | Path,
    meta: dict[str, Any],
    stitched: dict[str, Any],
    *,
    stride: int,
    names: dict[int, str],
    title: str,
) -> str | None:
    """The overlay PNG over the whole slide (a TMA core: over its tile), at most :data:`OVERLAY_MAX` px.

    Drawn from the tiles at the finest power-of-two downsample that fits; where no tile is (the slide
    past the tile grid) the slide's own thumbnail shows, so nothing is cut or padded white.

    Returns:
        A one-line warning when the slide could not be read for those areas (they stay white).
    """
    from equislide.storage import write_overlay_png

    rgb, l_origin, down, warning = overlay_picture(store, meta)
    gx, gy = stitched["l_origin"]
    mpp = meta.get("mpp")
    write_overlay_png(
        path,
        rgb,
        stitched["labels"],
        names=names,
        title=title,
        label_origin=((gx - l_origin[0]) / down, (gy - l_origin[1]) / down),
        label_scale=stride / down,
        pixel_size_um=float(mpp) * down if mpp else None,
    )
    return warning


def overlay_picture(
    store: str | Path, meta: dict[str, Any]
) -> tuple[np.ndarray, tuple[int, int], int, str | None]:
    """The picture under the overlay: ``(rgb, l_origin, down, warning)``.

    A whole slide's full rectangle (a TMA core's tile) at ``down`` analysis px per pixel, the finest
    power of two within :data:`OVERLAY_MAX`: stored tiles where there are tiles, the slide's own
    thumbnail elsewhere (``warning`` says so when the slide cannot be read: those areas stay white).
    ``l_origin`` is the analysis pixel of the picture's corner.
    """
    from equislide.storage import downsample_plane, tile_plane

    plane = tile_plane(store, extent="slide" if meta.get("kind", "slide") == "slide" else "tiles")
    h, w = plane.shape[:2]
    down = 1
    while max(h, w) > OVERLAY_MAX * down:
        down *= 2
    rgb, covered = downsample_plane(plane, down)
    warning = None
    if not covered.all():
        try:
            rgb[~covered] = _slide_background(meta, plane.l_origin, down, rgb.shape[:2])[~covered]
        except Exception as exc:  # the overlay is still useful without the slide's margins
            warning = f"overlay: slide not read for the areas without tiles ({type(exc).__name__}: {exc})"
    return rgb, plane.l_origin, down, warning


def _slide_background(
    meta: dict[str, Any], l_origin: tuple[int, int], down: int, shape: tuple[int, int]
) -> np.ndarray:
    """The slide's thumbnail on the overlay's pixel grid (``down`` analysis px per pixel)."""
    from PIL import Image

    from equislide.tiling import open_slide

    source = meta.get("source_path")
    if not source:
        raise FileNotFoundError("the store names no source_path")
    l0_per_l = meta.get("l0_per_l") or (1.0, 1.0)
    step = (down * float(l0_per_l[0]), down * float(l0_per_l[1]))  # level-0 px per overlay px
    with open_slide(source) as slide:
        thumb, ds = slide.thumbnail(max_size=max(shape) * 2)
    # Overlay px (c, r) spans level-0 [(l_x + c * down) * l0_per_l_x, ...): crop that box from the thumbnail.
    box = (
        l_origin[0] * float(l0_per_l[0]) / ds,
        l_origin[1] * float(l0_per_l[1]) / ds,
        (l_origin[0] * float(l0_per_l[0]) + shape[1] * step[0]) / ds,
        (l_origin[1] * float(l0_per_l[1]) + shape[0] * step[1]) / ds,
    )
    picture = Image.fromarray(thumb).resize((shape[1], shape[0]), Image.Resampling.BOX, box=box)
    return np.asarray(picture)


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
    )

    spec = spec or ClusterSpec()
    t0 = time.perf_counter()
    meta = read_sample_meta(store)
    sample_id = meta["sample_id"]
    from equislide.storage.confine import confined

    out_dir = Path(out_dir)
    base = confined(out_dir, out_dir / sample_id)  # the ID comes from the store's metadata
    marker_path = base.with_name(base.name + SEGMENT_MARKER_SUFFIX)
    fmeta = read_features_meta(store, layer)
    stride = int(fmeta["stride"])
    identity = {
        "format": CLUSTER_FORMAT,
        "sample": store_identity(store),
        "features": fmeta["params_sha256"],
        "kmeans": {"mode": "cohort", "sha256": kmeans.sha256} if kmeans is not None else spec.params(),
        "outputs": OUTPUTS_FORMAT,
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
    stitched = stitch_store(store, tile_labels, stride=stride, image=False)
    labels = stitched["labels"]
    pixel_size = stitched["pixel_size_um"]
    names = {v + 1: f"cluster {v + 1}" for v in range(model.k)}
    outputs = {
        "ome_zarr": str(base.with_name(base.name + ".ome.zarr")),
        "overlay_png": str(base.with_name(base.name + ".png")),
        "geojson": str(base.with_name(base.name + ".geojson")),
        "kmeans": model_path,
    }
    base.parent.mkdir(parents=True, exist_ok=True)
    warnings = list(meta.get("warnings") or [])
    write_sample_ome_zarr(outputs["ome_zarr"], store, meta, stitched, stride=stride, names=names)
    warning = write_sample_overlay(
        outputs["overlay_png"], store, meta, stitched, stride=stride, names=names, title=sample_id
    )
    if warning:
        warnings.append(warning)
    geojson = labels_to_geojson(
        labels,
        stride=stride,
        l0_per_l=stitched["l0_per_l"],
        l0_offset=stitched["l0_origin"],
        names=names,
        sample_id=sample_id,
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
        "warnings": warnings,
    }
    # The marker names files relative to out_dir, so two runs in different folders write the same bytes.
    stored = {**result, "outputs": {k: os.path.relpath(v, out_dir) for k, v in outputs.items()}}
    marker_doc = {"format": CLUSTER_FORMAT, "key": key, "identity": identity, "result": stored}
    atomic_write_json(marker_path, marker_doc)
    return {**result, "status": "written", "seconds": round(time.perf_counter() - t0, 3)}


def tma_slides(stores: Sequence[str | Path]) -> dict[str, list[str]]:
    """The TMA core stores among ``stores``, grouped by their slide's sample ID (in the order given).

    Whole-slide stores are left out. Raises :class:`~equislide.storage.StoreLayoutError` for a store
    that is not a finished one.
    """
    from equislide.storage import read_sample_meta

    out: dict[str, list[str]] = {}
    for store in stores:
        meta = read_sample_meta(store)
        if meta.get("kind") == "tma_core":
            out.setdefault(str(meta["slide_sample_id"]), []).append(str(store))
    return out


def write_tma_geojson(slide_id: str, stores: Sequence[str | Path], out_dir: str | Path) -> str:
    """Write one TMA slide's grid as QuPath ``tmaCore`` objects: ``<out_dir>/<slide_id>.tma.geojson``.

    Each core found is the ellipse inscribed in its tile less the tiling margin (``halo``), in level-0
    px: the same diameter for every core, as QuPath's own dearrayer draws them. Grid positions without
    a core (inside the ``rows x cols`` box of the cores found) are written too, ``isMissing`` true,
    placed on the lattice fitted through the others (:func:`~equislide.tiling.fill_grid`). The file
    depends only on the stores, so a rerun writes the same bytes.

    Args:
        slide_id: The slide's sample ID (``tma01`` for cores ``tma01/B3``).
        stores: The finished stores of the slide's cores (:func:`tma_slides`).
        out_dir: The run's ``samples/`` folder.

    Returns:
        The path written.

    Raises:
        ValueError: A store is not a core of ``slide_id``, or two stores claim one grid position.
    """
    from equislide.storage import read_sample_meta, tma_cores_to_geojson, write_geojson
    from equislide.storage.tile_store import open_finished
    from equislide.tiling import fill_grid

    boxes: dict[tuple[int, int], tuple[float, float, float, float]] = {}
    sample_of: dict[tuple[int, int], str] = {}
    l0_size = None
    for store in stores:
        meta = read_sample_meta(store)
        if meta.get("kind") != "tma_core" or meta.get("slide_sample_id") != slide_id:
            raise ValueError(f"{store}: not a TMA core of slide {slide_id!r}")
        group, _ = open_finished(store)
        l_x, l_y = (float(v) for v in np.asarray(group["coords"][0]))
        side = float(meta["tile"])
        margin = float((meta.get("params") or {}).get("halo") or 0)
        if side - 2 * margin <= 0:  # a margin wider than the core: take the whole tile
            margin = 0.0
        fx, fy = (float(v) for v in meta["l0_per_l"])
        key = (int(meta["core"]["row"]), int(meta["core"]["col"]))
        if key in boxes:
            raise ValueError(f"{store}: grid position {meta['core']['name']} of {slide_id!r} given twice")
        boxes[key] = (
            (l_x + margin) * fx,
            (l_y + margin) * fy,
            (l_x + side - margin) * fx,
            (l_y + side - margin) * fy,
        )
        sample_of[key] = str(meta["sample_id"])
        l0_size = meta.get("source_dimensions") or l0_size
    cores = [{**c, "sample_id": sample_of.get((c["row"], c["col"]))} for c in fill_grid(boxes)]
    collection = clip_to_slide(tma_cores_to_geojson(cores, slide_id=slide_id), l0_size)
    path = Path(out_dir) / f"{slide_id}{TMA_GEOJSON_SUFFIX}"
    return str(write_geojson(path, collection))

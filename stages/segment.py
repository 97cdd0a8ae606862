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
    "prepare_pictures",
    "segment_ranges",
    "segment_share",
    "segment_store",
    "segment_store_ranges",
    "tma_slides",
    "write_sample_ome_zarr",
    "write_sample_overlay",
    "write_tma_geojson",
]

#: A sample's outputs are finished when ``<out>/<sample_id>.segment.json`` exists with the same key.
SEGMENT_MARKER_SUFFIX = ".segment.json"
#: Longest side of an overlay PNG, px: drawn from the tiles at the finest resolution that fits.
OVERLAY_MAX = 2048
#: The overlay's picture and the OME-Zarr image levels, kept in a finished tile store by
#: :func:`prepare_pictures`.
PICTURE_ARRAY = "overlay_picture"
IMAGE_LEVELS = "ome_image_levels"
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
    label_values: dict[str, list[int]] | None = None,
    **options: Any,
) -> Path:
    """The sample's OME-Zarr: its analysis plane from the tile store as a pyramid, labels on it.

    The image is the tile interiors' extent cut to the slide (:func:`~equislide.storage.tile_plane`),
    streamed a band at a time; the label maps (feature resolution, ``stitched`` from
    :func:`~equislide.storage.stitch_store`) are sampled onto every level (nearest). A translation
    places the sample where it lies on its slide (a TMA core at its core, a slide's cut grid at its
    first pixel), and ``attrs["equislide"]`` gives the level-0 offset. ``options`` go to
    :func:`~equislide.storage.write_ome_zarr` (``min_side``, ``chunk``). Label maps given as zarr
    arrays (:func:`segment_store_ranges`) need ``label_values`` (``{"clusters": [...], "tissue":
    [...]}``) and are read a band at a time.
    """
    from equislide.storage import NGFF_VERSION, tile_plane, write_ome_zarr

    plane = tile_plane(store)
    if not options and ngff_version in (None, NGFF_VERSION):  # the levels prepare_pictures keeps
        options = {"image_levels": _kept_image_levels(store)}
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
        label_values=label_values,
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
    label_values: list[int] | None = None,
) -> str | None:
    """The overlay PNG over the whole slide (a TMA core: over its tile), at most :data:`OVERLAY_MAX` px.

    Drawn from the tiles at the finest power-of-two downsample that fits; where no tile is (the slide
    past the tile grid) the slide's own thumbnail shows, so nothing is cut or padded white.

    ``label_values``: the values of a label map given as a zarr array (read only where the picture
    samples it).

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
        label_values=label_values,
    )
    return warning


def overlay_picture(
    store: str | Path, meta: dict[str, Any]
) -> tuple[np.ndarray, tuple[int, int], int, str | None]:
    """The picture under the overlay: ``(rgb, l_origin, down, warning)``.

    A whole slide's full rectangle (a TMA core's tile) at ``down`` analysis px per pixel, the finest
    power of two within :data:`OVERLAY_MAX`: stored tiles where there are tiles, the slide's own
    thumbnail elsewhere (``warning`` says so when the slide cannot be read: those areas stay white).
    ``l_origin`` is the analysis pixel of the picture's corner. The picture :func:`prepare_pictures`
    kept in the store when its key still holds, else drawn now.
    """
    kept = _kept_picture(store)
    return kept if kept is not None else _draw_overlay_picture(store, meta)


def prepare_pictures(store: str | Path) -> dict[str, Any]:
    """Draw the pictures of a finished tile store's outputs and keep them in it: the overlay's
    (``overlay_picture``) and the OME-Zarr image levels (``ome_image_levels``).

    Both need only the tiles and the slide, yet drawing them (reading every tile twice, averaging the
    pyramid, a thumbnail of the slide for the overlay's margins) was most of a large sample's segment
    publishing, which is serial and the last step of its run. The flow runs this during the features
    stage instead, as its own task, so the publishing unit only copies the levels and draws the labels.

    Returns:
        ``{"sample_id", "status": "written" | "skipped", "seconds"}`` (skipped: both kept, same key).
    """
    import zarr

    from equislide.storage import read_sample_meta, tile_plane, write_image_levels

    t0 = time.perf_counter()
    meta = read_sample_meta(store)
    record = {"sample_id": meta["sample_id"]}
    if _kept_picture(store) is not None and _kept_image_levels(store) is not None:
        return {**record, "status": "skipped", "seconds": round(time.perf_counter() - t0, 3)}
    key = _picture_key(store)
    write_image_levels(Path(store) / IMAGE_LEVELS, tile_plane(store), attributes={"equislide": {"key": key}})
    rgb, l_origin, down, warning = _draw_overlay_picture(store, meta)
    group = zarr.open_group(zarr.storage.LocalStore(store), mode="r+")
    arr = group.create_array(
        PICTURE_ARRAY, shape=rgb.shape, dtype=np.uint8, chunks=(512, 512, 3), overwrite=True
    )
    arr[...] = rgb
    # The key last: a picture killed half-written has none, so it is drawn again.
    info = {"l_origin": [int(v) for v in l_origin], "down": int(down), "warning": warning}
    arr.update_attributes({"equislide": {**info, "key": key}})
    return {**record, "status": "written", "seconds": round(time.perf_counter() - t0, 3)}


def _kept_image_levels(store: str | Path) -> Path | None:
    """The OME-Zarr image levels kept in ``store`` when their key still holds; None otherwise."""
    import zarr

    path = Path(store) / IMAGE_LEVELS
    try:
        info = dict(zarr.open_group(path, mode="r").attrs).get("equislide") or {}
    except Exception:  # noqa: BLE001 - absent or unreadable: the writer averages the image itself
        return None
    return path if info.get("key") == _picture_key(store) else None


def _picture_key(store: str | Path) -> str:
    """What the kept pictures were drawn from: the store's identity, the overlay's size, the outputs'
    format (the NGFF version and the pyramid's layout are in it)."""
    import hashlib
    import json

    from equislide.storage import store_identity

    doc = {"store": store_identity(store), "overlay_max": OVERLAY_MAX, "outputs": OUTPUTS_FORMAT, "format": 1}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _kept_picture(store: str | Path) -> tuple[np.ndarray, tuple[int, int], int, str | None] | None:
    """The picture kept in ``store`` when its key still holds; None otherwise (or unreadable)."""
    import zarr

    try:
        group = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
        if PICTURE_ARRAY not in group:
            return None
        arr = group[PICTURE_ARRAY]
        info = dict(arr.attrs).get("equislide") or {}
        if info.get("key") != _picture_key(store):
            return None
        x, y = info["l_origin"]
        return np.asarray(arr[...]), (int(x), int(y)), int(info["down"]), info.get("warning")
    except Exception:  # noqa: BLE001 - a picture that cannot be read is drawn again
        return None


def _draw_overlay_picture(
    store: str | Path, meta: dict[str, Any]
) -> tuple[np.ndarray, tuple[int, int], int, str | None]:
    """:func:`overlay_picture`, drawn from the tiles and the slide."""
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
        thumb, ds = slide.thumbnail(max_size=max(shape))
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


def _plan(
    store: str | Path,
    out_dir: str | Path,
    layer: int,
    spec: ClusterSpec,
    kmeans: KMeansRef | None,
) -> dict[str, Any]:
    """The sample's names, feature grid and segment key; ``"done"``: the finished result, when its
    marker has the key and its outputs are there."""
    from equislide.files import read_json
    from equislide.storage import params_hash, read_features_meta, read_sample_meta, store_identity
    from equislide.storage.confine import confined

    meta = read_sample_meta(store)
    sample_id = meta["sample_id"]
    out_dir = Path(out_dir)
    base = confined(out_dir, out_dir / sample_id)  # the ID comes from the store's metadata
    marker_path = base.with_name(base.name + SEGMENT_MARKER_SUFFIX)
    fmeta = read_features_meta(store, layer)
    identity = {
        "format": CLUSTER_FORMAT,
        "sample": store_identity(store),
        "features": fmeta["params_sha256"],
        "kmeans": {"mode": "cohort", "sha256": kmeans.sha256} if kmeans is not None else spec.params(),
        "outputs": OUTPUTS_FORMAT,
    }
    plan = {
        "meta": meta,
        "sample_id": sample_id,
        "out_dir": out_dir,
        "base": base,
        "marker_path": marker_path,
        "fmeta": fmeta,
        "stride": int(fmeta["stride"]),
        "identity": identity,
        "key": params_hash(identity),
        "done": None,
    }
    marker = read_json(marker_path)
    if marker is not None and marker.get("key") == plan["key"]:
        result = dict(marker["result"])
        result["outputs"] = {k: os.path.normpath(out_dir / v) for k, v in result["outputs"].items()}
        if outputs_present(result["outputs"]):
            plan["done"] = {**result, "status": "skipped", "seconds": 0.0}
        # Else the marker vouches for outputs that are gone (deleted, or a concurrent run): write again.
    return plan


def _fitted_model(plan: dict[str, Any], store: str | Path, layer: int, spec: ClusterSpec) -> tuple[Any, str]:
    """The sample's own K-means (the paper's protocol), fitted and saved beside its outputs."""
    from equislide.stages.cluster import fit_store

    base = plan["base"]
    model = fit_store(store, layer=layer, stride=plan["stride"], spec=spec)
    model_path = str(base.with_name(base.name + ".kmeans.safetensors"))
    model.save(model_path, provenance=plan["identity"])
    return model, model_path


def _write_outputs(
    plan: dict[str, Any],
    store: str | Path,
    stitched: dict[str, Any],
    *,
    k: int,
    model_path: str,
    label_counts: dict[int, int],
    values: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """OME-Zarr, overlay PNG and GeoJSON of a stitched map (numpy, or zarr arrays with ``values``),
    then the marker (last). Returns the result without ``status`` and ``seconds``."""
    from equislide.files import atomic_write_json, sha256_file
    from equislide.storage import labels_to_geojson, write_geojson

    meta, base, sample_id, stride = plan["meta"], plan["base"], plan["sample_id"], plan["stride"]
    out_dir = plan["out_dir"]
    labels = stitched["labels"]
    names = {v + 1: f"cluster {v + 1}" for v in range(k)}
    outputs = {
        "ome_zarr": str(base.with_name(base.name + ".ome.zarr")),
        "overlay_png": str(base.with_name(base.name + ".png")),
        "geojson": str(base.with_name(base.name + ".geojson")),
        "kmeans": model_path,
    }
    base.parent.mkdir(parents=True, exist_ok=True)
    warnings = list(meta.get("warnings") or [])
    lazy = {"label_values": values} if values is not None else {}
    write_sample_ome_zarr(outputs["ome_zarr"], store, meta, stitched, stride=stride, names=names, **lazy)
    warning = write_sample_overlay(
        outputs["overlay_png"],
        store,
        meta,
        stitched,
        stride=stride,
        names=names,
        title=sample_id,
        label_values=None if values is None else values["clusters"],
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
    result = {
        "sample_id": sample_id,
        "outputs": outputs,
        "label_counts": {str(int(v)): int(c) for v, c in sorted(label_counts.items())},
        "shape": [int(v) for v in labels.shape],
        "stride": stride,
        "pixel_size_um": stitched["pixel_size_um"],
        "kmeans_sha256": sha256_file(model_path),
        "warnings": warnings,
    }
    # The marker names files relative to out_dir, so two runs in different folders write the same bytes.
    stored = {**result, "outputs": {k: os.path.relpath(v, out_dir) for k, v in outputs.items()}}
    doc = {"format": CLUSTER_FORMAT, "key": plan["key"], "identity": plan["identity"], "result": stored}
    atomic_write_json(plan["marker_path"], doc)
    return result


def segment_store(
    store: str | Path,
    out_dir: str | Path,
    *,
    layer: int,
    spec: ClusterSpec | None = None,
    kmeans: KMeansRef | None = None,
) -> dict[str, Any]:
    """Label map and viewable outputs of one sample (skipped when already written with the same key).

    The whole label map is stitched in this process; :func:`segment_store_ranges` writes the same
    outputs from tile ranges spread over several processes, a band of the map at a time.

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
    from equislide.models.kmeans import KMeansModel
    from equislide.stages.features import feature_batches
    from equislide.storage import stitch_store

    spec = spec or ClusterSpec()
    t0 = time.perf_counter()
    plan = _plan(store, out_dir, layer, spec, kmeans)
    if plan["done"] is not None:
        return plan["done"]
    meta, fmeta = plan["meta"], plan["fmeta"]
    if kmeans is not None:
        model, model_path = KMeansModel.load(kmeans.path), kmeans.path
    else:
        model, model_path = _fitted_model(plan, store, layer, spec)
    tile_labels = np.zeros((int(meta["n_tiles"]), int(fmeta["f_tile"]), int(fmeta["f_tile"])), np.uint16)
    for start, feats in feature_batches(store, layer):
        tile_labels[start : start + len(feats)] = model.predict(feats)
    stitched = stitch_store(store, tile_labels, stride=plan["stride"], image=False)
    values, counts = np.unique(stitched["labels"], return_counts=True)
    result = _write_outputs(
        plan,
        store,
        stitched,
        k=model.k,
        model_path=model_path,
        label_counts=dict(zip(values.tolist(), counts.tolist(), strict=True)),
    )
    return {**result, "status": "written", "seconds": round(time.perf_counter() - t0, 3)}


def segment_ranges(store: str | Path) -> list[tuple[int, int]]:
    """The tile ranges a sample is segmented in: its feature ranges
    (:func:`~equislide.stages.features.feature_ranges`), whole feature shards, so each range reads
    whole feature chunks and writes whole label chunks."""
    from equislide.stages.features import feature_ranges

    return feature_ranges(store)


def segment_store_ranges(
    store: str | Path,
    out_dir: str | Path,
    *,
    layer: int,
    spec: ClusterSpec | None = None,
    kmeans: KMeansRef | None = None,
    ranges: Sequence[tuple[int, int]] | None = None,
    band_rows: int | None = None,
) -> dict[str, Any]:
    """:func:`segment_store` in tile ranges: several processes may segment ranges of one sample at once.

    Each range's cluster maps go into the sample's shared partial label array
    (:func:`~equislide.storage.label_ranges.open_label_ranges`, ``<sample_id>.segment.partial``) and a
    done file; the call that finds every range done stitches the map there a band at a time and writes
    the outputs from it (the OME-Zarr level by level and band by band, the overlay from the rows it
    samples, the GeoJSON from band polygons merged per label), then the marker, then removes the
    partial. No process holds the slide's whole label map. The outputs equal :func:`segment_store`'s
    (the GeoJSON's geometry, up to the order of the polygons in a MultiPolygon). A rerun after a kill
    computes only the ranges without a done file; a partial of another key is discarded.

    Args:
        store, out_dir, layer, spec, kmeans: As :func:`segment_store`. With ``kmeans`` None, the first
            range to run fits the sample's model (under the partial's lock) and the others load it.
        ranges: Ranges of :func:`segment_ranges` (a share of the sample); default all of them.
        band_rows: Rows of the label map per band (and its chunk side) when publishing; default
            :data:`~equislide.storage.label_ranges.MAP_CHUNK`.

    Returns:
        ``{"sample_id", "status" ("written" | "skipped"), "n_tiles" (of the store), "tiles_done" (here),
        "ranges" [{"start", "stop", "status", "seconds"}], "published" (this call found the sample
        complete: its outputs and marker are written), "seconds"}``; when published also
        :func:`segment_store`'s keys (``outputs``, ``label_counts``, ...).
    """
    import shutil

    from equislide.storage import feature_shard_tiles, open_features
    from equislide.storage.label_ranges import PARTIAL_SUFFIX, open_label_ranges
    from equislide.storage.ranges import folder_lock

    spec = spec or ClusterSpec()
    t0 = time.perf_counter()
    plan = _plan(store, out_dir, layer, spec, kmeans)
    todo = segment_ranges(store) if ranges is None else [(int(a), int(b)) for a, b in ranges]
    n = int(plan["meta"]["n_tiles"])
    share = {"sample_id": plan["sample_id"], "n_tiles": n}

    def report(results: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        written = any(r["status"] == "written" for r in results) or extra.get("status") == "written"
        return {
            **extra,
            **share,
            "status": "written" if written else "skipped",
            "tiles_done": sum(r["stop"] - r["start"] for r in results if r["status"] == "written"),
            "ranges": results,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    if plan["done"] is not None:
        skipped = [{"start": a, "stop": b, "status": "skipped", "seconds": 0.0} for a, b in todo]
        return report(skipped, {**plan["done"], "published": True})
    base, fmeta = plan["base"], plan["fmeta"]
    partial = base.with_name(base.name + PARTIAL_SUFFIX)
    writer = open_label_ranges(
        partial,
        n_tiles=n,
        f_tile=int(fmeta["f_tile"]),
        shard_tiles=feature_shard_tiles(n),
        key=plan["key"],
    )
    model = model_path = None
    results = []
    for start, stop in todo:
        if writer.is_done(start, stop):  # done before, or by another process meanwhile
            results.append({"start": start, "stop": stop, "status": "skipped", "seconds": 0.0})
            continue
        r0 = time.perf_counter()
        if model is None:
            model, model_path = _range_model(plan, writer.path, store, layer, spec, kmeans)
        feats = open_features(store, layer, tiles_per_chunk=writer.shard_tiles)
        for s0 in range(start, stop, writer.shard_tiles):
            s1 = min(stop, s0 + writer.shard_tiles)
            block = np.asarray(feats[s0:s1].compute(scheduler="synchronous"))
            writer.write(s0, np.asarray(model.predict(block)).astype(np.uint16))
        writer.mark_done(start, stop)
        results.append(
            {"start": start, "stop": stop, "status": "written", "seconds": round(time.perf_counter() - r0, 3)}
        )
    if not writer.complete():
        return report(results, {"published": False})
    try:
        if model is None:  # every range was done before: load the model (its own lock, so not below)
            model, model_path = _range_model(plan, writer.path, store, layer, spec, kmeans)
        with folder_lock(writer.path):  # one finishing call per sample; a second finds the marker
            again = _plan(store, out_dir, layer, spec, kmeans)
            if again["done"] is not None:
                return report(results, {**again["done"], "published": True})
            result = _publish_ranges(
                plan, store, writer, k=model.k, model_path=model_path, band_rows=band_rows
            )
            shutil.rmtree(writer.path, ignore_errors=True)  # under the lock: a waiting call finds the marker
    except FileNotFoundError:
        # Another call published the sample and removed the partial before this one could lock it.
        again = _plan(store, out_dir, layer, spec, kmeans)
        if again["done"] is None:
            raise
        return report(results, {**again["done"], "published": True})
    return report(results, {**result, "status": "written", "published": True})


def segment_share(
    share: tuple[str | Path, Sequence[tuple[int, int]] | None],
    *,
    out_dir: str | Path,
    layer: int,
    spec: ClusterSpec | None = None,
    kmeans: KMeansRef | None = None,
) -> dict[str, Any]:
    """One work unit's share ``(store, ranges)`` as the flow's segment tasks pass it (one picklable
    argument): ranges None, the whole sample (:func:`segment_store`); else those ranges
    (:func:`segment_store_ranges`, publishing when they complete the sample)."""
    store, ranges = share
    if ranges is None:
        return segment_store(store, out_dir, layer=layer, spec=spec, kmeans=kmeans)
    return segment_store_ranges(store, out_dir, layer=layer, spec=spec, kmeans=kmeans, ranges=ranges)


def _range_model(
    plan: dict[str, Any],
    partial: Path,
    store: str | Path,
    layer: int,
    spec: ClusterSpec,
    kmeans: KMeansRef | None,
) -> tuple[Any, str]:
    """The cohort model, or the sample's own: fitted once (the first range's call, under the partial's
    lock; the fit is seeded, so which call fits does not matter) and loaded by the others."""
    from equislide.files import atomic_write_json
    from equislide.models.kmeans import KMeansModel
    from equislide.storage.ranges import folder_lock

    if kmeans is not None:
        return KMeansModel.load(kmeans.path), kmeans.path
    base = plan["base"]
    model_path = str(base.with_name(base.name + ".kmeans.safetensors"))
    fitted = partial / "kmeans-fitted.json"  # in the partial: a partial of another key never vouches
    with folder_lock(partial):
        if fitted.is_file() and Path(model_path).is_file():
            return KMeansModel.load(model_path), model_path
        model, model_path = _fitted_model(plan, store, layer, spec)
        atomic_write_json(fitted, {"path": os.path.basename(model_path)})
        return model, model_path


def _publish_ranges(
    plan: dict[str, Any],
    store: str | Path,
    writer: Any,
    *,
    k: int,
    model_path: str,
    band_rows: int | None = None,
) -> dict[str, Any]:
    """Stitch a complete partial's map in bands and write the outputs and the marker from it."""
    from equislide.storage.label_ranges import MAP_CHUNK, stitch_label_map

    stitched = stitch_label_map(
        store, writer.tile_labels, writer.group, stride=plan["stride"], band_rows=band_rows or MAP_CHUNK
    )
    return _write_outputs(
        plan,
        store,
        stitched,
        k=k,
        model_path=model_path,
        label_counts=stitched["label_counts"],
        values=stitched["values"],
    )


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

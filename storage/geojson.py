"""QuPath-ready GeoJSON: one MultiPolygon annotation per cluster, in slide level-0 pixel coordinates.

Polygons come from the label map (:mod:`equislide.storage.labels` codes: 0 = no tissue, ``k + 1`` =
cluster ``k``) through GDAL's polygonizer (:func:`rasterio.features.shapes`, 4-connected), so rings
follow pixel edges exactly and enclose exactly the pixels' area, holes included. 4-connectivity is what
keeps them valid: two pixels that touch only at a corner become two polygons meeting at a point (valid
in a MultiPolygon), never one ring passing through the same vertex twice ("Ring Self-intersection",
which JTS in QuPath rejects in union and area). Simplification is shapely's topology-preserving
Douglas-Peucker (``simplify`` label px), which keeps every ring simple and every hole inside its shell;
every written geometry is checked with :func:`shapely.is_valid`.

Coordinate planes: ``f_`` = label-map px (pixel ``(f_row, f_col)`` covers ``[f_col, f_col + 1) x
[f_row, f_row + 1)``), ``l_`` = analysis px (``l = f * stride``), ``l0_`` = slide level-0 px::

    l0_x = l_x * l0_per_l + l0_offset_x          l0_per_l = analysis mpp / source mpp

(``l0_offset`` = the level-0 position of the sample's analysis origin: ``(0, 0)`` for a whole slide,
the core's corner for a TMA core). Rings are closed; exteriors are counter-clockwise and holes
clockwise by the shoelace sign of the (x, y) numbers, as RFC 7946 asks (JTS and QuPath accept either
orientation). Each Feature carries a UUID ``id`` (QuPath keeps it as the object's ID; :func:`feature_id`,
a name-based UUID 5 of the sample and the label value, so a rerun writes the same bytes) and
``properties = {"objectType": "annotation", "classification": {"name": "cluster 1", "color": [r, g,
b]}, "label_value": 1}`` with colours from :data:`~equislide.storage.labels.PALETTE`.

TMA slides also get their dearrayed cores as QuPath ``tmaCore`` objects (:func:`tma_cores_to_geojson`):
one ellipse per grid position, row-major, ``properties = {"objectType": "tmaCore", "name": "B3",
"isMissing": false}``. QuPath builds a TMA core from the bounds of the geometry and takes ``name`` and
``isMissing`` as they are; listing every position of the ``rows x cols`` grid (missing ones included)
in row-major order is what ``DefaultTMAGrid.create(cores, cols)`` needs to rebuild the grid.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equislide.files import atomic_write_bytes
from equislide.storage.labels import NO_TISSUE, label_color

__all__ = [
    "GEOJSON_NAMESPACE",
    "feature_id",
    "label_polygons",
    "labels_to_geojson",
    "ring_area",
    "tma_cores_to_geojson",
    "write_geojson",
]

#: Namespace of every feature ``id`` (:func:`feature_id`): fixed, so IDs are the same on every machine.
GEOJSON_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "equislide:geojson")
#: Label dtypes GDAL's polygonizer reads as they are; others are converted to int32.
_GDAL_DTYPES = (np.uint8, np.uint16, np.int16, np.int32)


def feature_id(*parts: object) -> str:
    """A name-based UUID (version 5) of ``parts``, e.g. ``feature_id("tma01/B3", "cluster", 2)``."""
    return str(uuid.uuid5(GEOJSON_NAMESPACE, "/".join(str(p) for p in parts)))


def ring_area(ring: np.ndarray | list) -> float:
    """Signed shoelace area of a ring of (x, y) points (positive = counter-clockwise in x-right, y-up)."""
    r = np.asarray(ring, dtype=np.float64)
    x, y = r[:, 0], r[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _label_geometries(labels: Any, *, simplify: float, min_area: float) -> dict[int, Any]:
    """``{label value: shapely MultiPolygon}`` in ``f_`` (x, y), oriented, simplified and valid.

    One polygonizer pass over the whole map serves every label value. A map that is not a numpy array
    (a zarr array: a whole slide's map, stitched in bands) is traced from a file, never whole in
    memory (:func:`_traced_from_disk`).
    """
    import shapely

    if not isinstance(labels, np.ndarray) and hasattr(labels, "chunks"):
        polygons, values = _traced_from_disk(labels, min_area=min_area)
    else:
        polygons, values = _traced(np.asarray(labels), min_area=min_area)
    if not polygons:
        return {}
    polygons = shapely.orient_polygons(np.asarray(polygons, dtype=object))  # exteriors CCW, holes CW
    values = np.asarray(values)
    exact = {v: shapely.multipolygons(polygons[values == v]) for v in np.unique(values).tolist()}
    out = {}
    for value, geometry in exact.items():
        if simplify > 0:
            # One call over the whole MultiPolygon: JTS then also keeps its parts from crossing each other.
            simple = shapely.simplify(geometry, simplify, preserve_topology=True)
            if simple.geom_type == "Polygon":
                simple = shapely.multipolygons([simple])
            # Should GEOS ever hand back something invalid, the exact rings (valid as traced) are kept.
            if simple.geom_type == "MultiPolygon" and shapely.is_valid(simple):
                geometry = shapely.orient_polygons(simple)
        if not shapely.is_valid(geometry):  # a polygonizer bug must not reach QuPath unnoticed
            raise ValueError(f"label {value}: invalid polygon ({shapely.is_valid_reason(geometry)})")
        out[value] = geometry
    return out


def _traced(labels: np.ndarray, *, min_area: float) -> tuple[list[Any], list[int]]:
    """GDAL's 4-connected polygons of the map's labelled pixels and their values."""
    from rasterio.features import shapes

    if labels.dtype not in _GDAL_DTYPES:
        if labels.size and (labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max):
            raise ValueError(f"label values of {labels.dtype} beyond int32 cannot be traced")
        labels = labels.astype(np.int32)
    mask = labels > NO_TISSUE
    if not mask.any():
        return [], []
    return _polygons(shapes(labels, mask=mask, connectivity=4), min_area=min_area)


def _polygons(traced: Any, *, min_area: float) -> tuple[list[Any], list[int]]:
    """Shapely polygons and values of rasterio's ``shapes`` output, dropping those under ``min_area``."""
    import shapely

    polygons, values = [], []
    for geom, value in traced:
        # Rings as arrays: about 3x faster than shapely.geometry.shape on the nested tuples.
        rings = [np.asarray(ring, dtype=np.float64) for ring in geom["coordinates"]]
        if min_area > 0 and abs(ring_area(rings[0])) < min_area:
            continue
        polygons.append(shapely.Polygon(rings[0], rings[1:]))
        values.append(int(value))
    return polygons, values


def _traced_from_disk(labels: Any, *, min_area: float) -> tuple[list[Any], list[int]]:
    """:func:`_traced` of a lazy map without holding it: GDAL's polygonizer reads scanlines from a file.

    The map is copied a band of chunk rows at a time into an uncompressed GeoTIFF (and its mask into a
    second one) beside the zarr array, and :func:`rasterio.features.shapes` polygonizes the file's
    band, reading it line by line and keeping only the polygons still open. It is the very pass the
    in-memory path makes, so the polygons, their vertices and their order are the same, and so is
    the simplified geometry (which depends on the order: JTS simplifies a MultiPolygon's rings one
    after the other, each checked against the others). Tracing bands apart and merging them with
    ``unary_union`` gives the same exact geometry but rings in another order, and then a few vertices
    differ after simplification.
    """
    import tempfile
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.features import shapes
    from rasterio.windows import Window

    h, w = (int(v) for v in labels.shape)
    dtype = np.dtype(labels.dtype)
    if dtype not in _GDAL_DTYPES:
        dtype = np.dtype(np.int32)
    root = getattr(getattr(labels, "store", None), "root", None)
    where = str(root) if root is not None and Path(str(root)).is_dir() else None
    band = max(1, int(labels.chunks[0]))
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 1, "BIGTIFF": "IF_SAFER"}
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=where) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel coordinates are what we want
        lab_path, mask_path = Path(tmp) / "labels.tif", Path(tmp) / "mask.tif"
        with (
            rasterio.open(lab_path, "w", dtype=dtype, **profile) as lab,
            rasterio.open(mask_path, "w", dtype="uint8", **profile) as mask,
        ):
            for r0 in range(0, h, band):
                block = np.asarray(labels[r0 : r0 + band])
                window = Window(0, r0, w, block.shape[0])
                lab.write(block.astype(dtype, copy=False), 1, window=window)
                mask.write((block > NO_TISSUE).astype(np.uint8), 1, window=window)
        with rasterio.open(lab_path) as lab, rasterio.open(mask_path) as mask:
            traced = shapes(rasterio.band(lab, 1), mask=rasterio.band(mask, 1), connectivity=4)
            return _polygons(traced, min_area=min_area)


def _rings(polygon: Any) -> list[np.ndarray]:
    return [np.asarray(polygon.exterior.coords), *(np.asarray(r.coords) for r in polygon.interiors)]


def label_polygons(
    labels: np.ndarray, value: int, *, simplify: float = 0.5, min_area: float = 0.0
) -> list[list[np.ndarray]]:
    """Polygons (exterior + holes) of the pixels equal to ``value``, in ``f_`` (x, y) coordinates.

    Args:
        labels: ``(rows, cols)`` integer label map.
        value: The label value to trace (> 0).
        simplify: Topology-preserving Douglas-Peucker tolerance in label px (0 = none).
        min_area: Drop polygons whose exterior encloses less than this many label px².

    Returns:
        ``[[exterior, hole, ...], ...]``: each ring a closed ``(k, 2)`` float array of (f_x, f_y) on pixel
        edges (before simplification the enclosed area equals the pixel count); exteriors
        counter-clockwise, holes clockwise (shoelace sign of the numbers). Pixels of 4-connected
        components are one polygon; components touching at a corner are separate polygons.
    """
    mask = np.asarray(labels) == value
    geometry = _label_geometries(mask.astype(np.uint8), simplify=simplify, min_area=min_area).get(1)
    return [] if geometry is None else [_rings(p) for p in geometry.geoms]


def labels_to_geojson(
    labels: np.ndarray,
    *,
    stride: float,
    l0_per_l: float | tuple[float, float],
    l0_offset: tuple[float, float] = (0.0, 0.0),
    names: Mapping[int, str] | None = None,
    simplify: float = 0.5,
    min_area: float = 0.0,
    decimals: int = 2,
    sample_id: str = "",
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the label map's clusters, in slide level-0 px.

    Args:
        labels: ``(rows, cols)`` label map at feature resolution (0 = no tissue, ``k + 1`` = cluster ``k``);
            a zarr array is copied a band of chunk rows at a time into a file that GDAL's
            polygonizer reads line by line (the same output, without the map in memory).
        stride: Analysis px per label px.
        l0_per_l: Level-0 px per analysis px (analysis mpp / source mpp), or ``(x, y)`` factors.
        l0_offset: ``(l0_x, l0_y)`` of the sample's analysis origin in the slide.
        names: ``{label value: class name}``; default ``"cluster {value}"``.
        simplify: Topology-preserving Douglas-Peucker tolerance in label px (0 = exact pixel edges).
        min_area: Drop polygons smaller than this many label px².
        decimals: Round coordinates to this many decimals.
        sample_id: Seeds each Feature's UUID ``id`` (:func:`feature_id` of sample and label value).

    Returns:
        ``{"type": "FeatureCollection", "features": [...]}``, one MultiPolygon Feature per label value
        present (ascending), ready for ``json.dump``.
    """
    factors = np.broadcast_to(np.asarray(l0_per_l, dtype=np.float64), (2,))
    if not stride > 0 or not (factors > 0).all():
        raise ValueError(f"stride={stride!r} and l0_per_l={l0_per_l!r} must be > 0")
    if isinstance(labels, np.ndarray) or not hasattr(labels, "chunks"):
        labels = np.asarray(labels)
    if len(labels.shape) != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer map, got {labels.dtype} {labels.shape}")
    scale = float(stride) * factors
    offset = np.asarray(l0_offset, dtype=np.float64)
    features = []
    for value, geometry in _label_geometries(labels, simplify=simplify, min_area=min_area).items():
        coords = [
            [np.round(ring * scale + offset, decimals).tolist() for ring in _rings(p)] for p in geometry.geoms
        ]
        name = (names or {}).get(value, f"cluster {value}")
        features.append(
            {
                "type": "Feature",
                "id": feature_id(sample_id, "cluster", value),
                "geometry": {"type": "MultiPolygon", "coordinates": coords},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": list(label_color(value))},
                    "label_value": value,
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def tma_cores_to_geojson(
    cores: Sequence[Mapping[str, Any]], *, slide_id: str = "", decimals: int = 2, vertices: int = 64
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of a TMA slide's cores as QuPath ``tmaCore`` objects, level-0 px.

    Args:
        cores: Every grid position, row-major (as :func:`~equislide.tiling.fill_grid` gives them):
            ``{"name": "B3", "row": 1, "col": 2, "bbox": (l0_x0, l0_y0, l0_x1, l0_y1), "missing": False}``,
            optionally ``"sample_id"`` (kept in the object's metadata).
        slide_id: Seeds each Feature's UUID ``id`` (:func:`feature_id` of slide and core name).
        decimals: Round coordinates to this many decimals.
        vertices: Points on each ellipse (a multiple of 4, so its bounds are the box exactly).

    Returns:
        ``{"type": "FeatureCollection", "features": [...]}``, one Polygon Feature per position, in
        the order given, each the ellipse inscribed in ``bbox`` (QuPath keeps only its bounds).
    """
    if vertices < 8 or vertices % 4:
        raise ValueError(f"vertices={vertices} must be a multiple of 4, at least 8")
    angle = np.linspace(0.0, 2.0 * np.pi, vertices, endpoint=False)
    # Counter-clockwise by the numbers, closed; cos/sin of the quarter turns are made exact.
    unit = np.round(np.stack([np.cos(angle), np.sin(angle)], axis=1), 15)
    features = []
    for core in cores:
        x0, y0, x1, y1 = (float(v) for v in core["bbox"])
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"core {core.get('name')!r}: empty bbox {core['bbox']!r}")
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        ring = np.round(centre + unit * [(x1 - x0) / 2, (y1 - y0) / 2], decimals)
        ring = np.vstack([ring, ring[:1]])
        metadata = {"row": str(int(core["row"])), "col": str(int(core["col"]))}
        if core.get("sample_id"):
            metadata["sample_id"] = str(core["sample_id"])
        features.append(
            {
                "type": "Feature",
                "id": feature_id(slide_id, "tmaCore", core["name"]),
                "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
                "properties": {
                    "objectType": "tmaCore",
                    "name": str(core["name"]),
                    "isMissing": bool(core.get("missing", False)),
                    "metadata": metadata,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection atomically (temporary file + ``os.replace``); returns ``path``."""
    if collection.get("type") != "FeatureCollection" or not isinstance(collection.get("features"), list):
        raise ValueError("collection must be a GeoJSON FeatureCollection with a 'features' list")
    text = json.dumps(collection, separators=(",", ":")) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))

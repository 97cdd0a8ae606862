"""QuPath-ready GeoJSON: one MultiPolygon annotation per cluster, in slide level-0 pixel coordinates.

Polygons are traced on the label map (:mod:`equislide.storage.labels` codes: 0 = no tissue, ``k + 1``
= cluster ``k``) with marching squares (``skimage.measure.find_contours`` at level 0.5 on each
8-connected component, with the pixel corners it cuts put back, so rings follow pixel edges exactly
and enclose exactly the pixels' area), holes included, lightly simplified (Douglas-Peucker,
``simplify`` label px; collinear points are always dropped).

Coordinate planes: ``f_`` = label-map px (pixel ``(f_row, f_col)`` covers ``[f_col, f_col + 1) x
[f_row, f_row + 1)``), ``l_`` = analysis px (``l = f * stride``), ``l0_`` = slide level-0 px::

    l0_x = l_x * l0_per_l + l0_offset_x          l0_per_l = analysis mpp / source mpp

(``l0_offset`` = the level-0 position of the sample's analysis origin: ``(0, 0)`` for a whole slide,
the core's corner for a TMA core). Rings are closed; exteriors are counter-clockwise and holes
clockwise by the shoelace sign of the (x, y) numbers, as RFC 7946 asks. Each Feature carries
``properties = {"objectType": "annotation", "classification": {"name": "cluster 1", "color": [r, g,
b]}, "label_value": 1}`` with colours from :data:`~equislide.storage.labels.PALETTE`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from equislide.files import atomic_write_bytes
from equislide.storage.labels import NO_TISSUE, label_color

__all__ = ["label_polygons", "labels_to_geojson", "ring_area", "write_geojson"]


def ring_area(ring: np.ndarray | list) -> float:
    """Signed shoelace area of a ring of (x, y) points (positive = counter-clockwise in x-right, y-up)."""
    r = np.asarray(ring, dtype=np.float64)
    x, y = r[:, 0], r[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _close(ring: np.ndarray) -> np.ndarray:
    return ring if np.array_equal(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])


def _square_corners(ring: np.ndarray) -> np.ndarray:
    """Put back the pixel corners marching squares cuts off, so rings follow pixel edges exactly.

    Contour points sit on pixel-edge midpoints (one coordinate whole, the other half); a diagonal step
    between a vertical-edge and a horizontal-edge midpoint gets the lattice point between them inserted.
    """
    out = [ring[0]]
    for p, q in zip(ring[:-1], ring[1:], strict=True):
        if p[0] != q[0] and p[1] != q[1]:
            corner = (p[0], q[1]) if float(p[0]).is_integer() else (q[0], p[1])
            out.append(np.asarray(corner, dtype=np.float64))
        out.append(q)
    return np.asarray(out, dtype=np.float64)


def label_polygons(
    labels: np.ndarray, value: int, *, simplify: float = 0.5, min_area: float = 0.0
) -> list[list[np.ndarray]]:
    """Polygons (exterior + holes) of the pixels equal to ``value``, in ``f_`` (x, y) coordinates.

    Args:
        labels: ``(rows, cols)`` integer label map.
        value: The label value to trace.
        simplify: Douglas-Peucker tolerance in label px (0 = none).
        min_area: Drop polygons whose exterior encloses less than this many label px².

    Returns:
        ``[[exterior, hole, ...], ...]``: each ring a closed ``(k, 2)`` float array of (f_x, f_y) on pixel
        edges (before simplification the enclosed area equals the pixel count); exteriors
        counter-clockwise, holes clockwise (shoelace sign of the numbers).
    """
    from skimage.measure import approximate_polygon, find_contours, label, regionprops

    mask = np.asarray(labels) == value
    polygons: list[list[np.ndarray]] = []
    components = label(mask, connectivity=2)
    for region in regionprops(components):
        r0, c0, _, _ = region.bbox
        padded = np.pad(region.image, 1).astype(np.float32)
        rings = []
        for contour in find_contours(padded, 0.5, fully_connected="high"):
            # (row, col) pixel-centre coordinates in the padded crop -> (x, y) on pixel edges.
            xy = np.stack([contour[:, 1] + c0 - 1 + 0.5, contour[:, 0] + r0 - 1 + 0.5], axis=1)
            xy = approximate_polygon(_square_corners(_close(xy)), tolerance=1e-9)  # drop collinear points
            if simplify > 0 and len(xy) > 4:
                # Start at the lexicographically smallest vertex (a true, convex corner) so the fixed
                # end points of Douglas-Peucker never sit mid-edge next to a corner it would then drop.
                start = int(np.lexsort((xy[:-1, 1], xy[:-1, 0]))[0])
                xy = approximate_polygon(_close(np.roll(xy[:-1], -start, axis=0)), tolerance=simplify)
            xy = _close(xy)
            if len(xy) >= 4 and abs(ring_area(xy)) > 0:
                rings.append(xy)
        if not rings:
            continue
        rings.sort(key=lambda r: -abs(ring_area(r)))  # the exterior encloses all of the component
        exterior, holes = rings[0], rings[1:]
        if abs(ring_area(exterior)) < min_area:
            continue
        if ring_area(exterior) < 0:
            exterior = exterior[::-1]
        holes = [h[::-1] if ring_area(h) > 0 else h for h in holes]
        polygons.append([exterior, *holes])
    return polygons


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
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the label map's clusters, in slide level-0 px.

    Args:
        labels: ``(rows, cols)`` label map at feature resolution (0 = no tissue, ``k + 1`` = cluster ``k``).
        stride: Analysis px per label px.
        l0_per_l: Level-0 px per analysis px (analysis mpp / source mpp), or ``(x, y)`` factors.
        l0_offset: ``(l0_x, l0_y)`` of the sample's analysis origin in the slide.
        names: ``{label value: class name}``; default ``"cluster {value}"``.
        simplify: Douglas-Peucker tolerance in label px.
        min_area: Drop polygons smaller than this many label px².
        decimals: Round coordinates to this many decimals.

    Returns:
        ``{"type": "FeatureCollection", "features": [...]}``, one MultiPolygon Feature per label value
        present (ascending), ready for ``json.dump``.
    """
    factors = np.broadcast_to(np.asarray(l0_per_l, dtype=np.float64), (2,))
    if not stride > 0 or not (factors > 0).all():
        raise ValueError(f"stride={stride!r} and l0_per_l={l0_per_l!r} must be > 0")
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer map, got {labels.dtype} {labels.shape}")
    scale = float(stride) * factors
    offset = np.asarray(l0_offset, dtype=np.float64)
    features = []
    for value in (int(v) for v in np.unique(labels)):
        if value == NO_TISSUE or value < 0:
            continue
        polys = label_polygons(labels, value, simplify=simplify, min_area=min_area)
        if not polys:
            continue
        coords = [[np.round(ring * scale + offset, decimals).tolist() for ring in poly] for poly in polys]
        name = (names or {}).get(value, f"cluster {value}")
        features.append(
            {
                "type": "Feature",
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


def write_geojson(path: str | Path, collection: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection atomically (temporary file + ``os.replace``); returns ``path``."""
    if collection.get("type") != "FeatureCollection" or not isinstance(collection.get("features"), list):
        raise ValueError("collection must be a GeoJSON FeatureCollection with a 'features' list")
    text = json.dumps(collection, separators=(",", ":")) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))

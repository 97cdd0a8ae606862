"""Benchmark: the GeoJSON writer (GDAL polygonizer + GEOS) against the hand-written tracer it replaced.

Baseline, kept only here: the former ``storage/geojson.py`` tracer (``skimage.measure.find_contours``
on each 8-connected component, cut pixel corners put back, ``approximate_polygon``). Both turn the
same label map into a FeatureCollection with the product's defaults (``simplify=0.5`` label px) and
exact (``simplify=0``). Prints seconds, the speed-up over the baseline (``x`` > 1 is faster), the
features' vertex counts and how many polygons of each output fail :func:`shapely.is_valid` (the
reason the tracer went: corner-touching pixels traced as one self-touching ring).

Label maps: ``slide`` is smooth noise cut into ``k`` clusters inside a disc (ragged borders, like a
segmented whole slide at feature resolution); ``noisy`` adds 2 % salt-and-pepper pixels (isolated
pixels and corner contacts everywhere).

    python bench/geojson.py                  # 2000 x 2000, k = 4
    python bench/geojson.py --side 800       # quicker
    python bench/geojson.py --maps slide     # the clean map only
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import shape

from equislide.storage import labels_to_geojson
from equislide.storage.labels import NO_TISSUE


def label_map(side: int, k: int, seed: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((side, side)), side / 250)
    labels = (np.digitize(field, np.quantile(field, np.linspace(0, 1, k + 1)[1:-1])) + 1).astype(np.uint8)
    if noise > 0:
        flip = rng.random((side, side)) < noise
        labels[flip] = rng.integers(1, k + 1, int(flip.sum()))
    yy, xx = np.mgrid[:side, :side]
    labels[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 > (0.48 * side) ** 2] = NO_TISSUE
    return labels


# ---------------------------------------------------------------- the former tracer (baseline)


def _ring_area(r: np.ndarray) -> float:
    return 0.5 * float(np.dot(r[:, 0], np.roll(r[:, 1], -1)) - np.dot(np.roll(r[:, 0], -1), r[:, 1]))


def _close(ring: np.ndarray) -> np.ndarray:
    return ring if np.array_equal(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])


def _square_corners(ring: np.ndarray) -> np.ndarray:
    out = [ring[0]]
    for p, q in zip(ring[:-1], ring[1:], strict=True):
        if p[0] != q[0] and p[1] != q[1]:
            corner = (p[0], q[1]) if float(p[0]).is_integer() else (q[0], p[1])
            out.append(np.asarray(corner, dtype=np.float64))
        out.append(q)
    return np.asarray(out, dtype=np.float64)


def old_label_polygons(labels: np.ndarray, value: int, simplify: float) -> list[list[np.ndarray]]:
    from skimage.measure import approximate_polygon, find_contours, label, regionprops

    polygons = []
    for region in regionprops(label(labels == value, connectivity=2)):
        r0, c0, _, _ = region.bbox
        padded = np.pad(region.image, 1).astype(np.float32)
        rings = []
        for contour in find_contours(padded, 0.5, fully_connected="high"):
            xy = np.stack([contour[:, 1] + c0 - 0.5, contour[:, 0] + r0 - 0.5], axis=1)
            xy = approximate_polygon(_square_corners(_close(xy)), tolerance=1e-9)
            if simplify > 0 and len(xy) > 4:
                start = int(np.lexsort((xy[:-1, 1], xy[:-1, 0]))[0])
                xy = approximate_polygon(_close(np.roll(xy[:-1], -start, axis=0)), tolerance=simplify)
            xy = _close(xy)
            if len(xy) >= 4 and abs(_ring_area(xy)) > 0:
                rings.append(xy)
        if not rings:
            continue
        rings.sort(key=lambda r: -abs(_ring_area(r)))
        exterior, holes = rings[0], rings[1:]
        if _ring_area(exterior) < 0:
            exterior = exterior[::-1]
        polygons.append([exterior, *[h[::-1] if _ring_area(h) > 0 else h for h in holes]])
    return polygons


def old_labels_to_geojson(labels: np.ndarray, simplify: float) -> dict:
    features = []
    for value in (int(v) for v in np.unique(labels) if v > NO_TISSUE):
        polys = old_label_polygons(labels, value, simplify)
        coords = [[np.round(r, 2).tolist() for r in poly] for poly in polys]
        features.append({"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": coords}})
    return {"type": "FeatureCollection", "features": features}


# ---------------------------------------------------------------- measuring


def describe(fc: dict, labels: np.ndarray) -> tuple[int, int, int, float]:
    """(polygons, vertices, invalid polygons, worst relative area error against the pixel count)."""
    n_poly = n_vert = invalid = 0
    worst = 0.0
    for feat in fc["features"]:
        geom = shape(feat["geometry"])
        parts = list(geom.geoms)
        n_poly += len(parts)
        n_vert += int(shapely.get_num_coordinates(geom))
        invalid += int((~shapely.is_valid(np.asarray(parts, dtype=object))).sum())
        value = feat.get("properties", {}).get("label_value")
        if value is None:  # the baseline's features come in ascending label order
            value = sorted(int(v) for v in np.unique(labels) if v > NO_TISSUE)[fc["features"].index(feat)]
        want = float((labels == value).sum())
        worst = max(worst, abs(sum(shapely.area(parts)) - want) / want)
    return n_poly, n_vert, invalid, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=2000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs per row")
    ap.add_argument("--maps", nargs="+", default=["slide", "noisy"], choices=["slide", "noisy"])
    args = ap.parse_args()

    print(f"label map {args.side} x {args.side}, k = {args.k}, best of {args.repeat}")
    hdr = f"{'map':7s}{'simplify':>9s}{'row':>10s}{'s':>8s}{'x base':>8s}{'polygons':>10s}"
    print(hdr + f"{'vertices':>10s}{'invalid':>9s}{'area err':>10s}")
    for name, noise in (("slide", 0.0), ("noisy", 0.02)):
        if name not in args.maps:
            continue
        labels = label_map(args.side, args.k, args.seed, noise)
        for simplify in (0.5, 0.0):
            rows = {
                "tracer": lambda s=simplify, lab=labels: old_labels_to_geojson(lab, s),
                "gdal": lambda s=simplify, lab=labels: labels_to_geojson(
                    lab, stride=1, l0_per_l=1.0, simplify=s
                ),
            }
            base = None
            for row, fn in rows.items():
                best, fc = np.inf, None
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    fc = fn()
                    best = min(best, time.perf_counter() - t0)
                base = best if base is None else base
                n_poly, n_vert, invalid, err = describe(fc, labels)
                print(
                    f"{name:7s}{simplify:>9.1f}{row:>10s}{best:>8.2f}{base / best:>8.2f}{n_poly:>10d}"
                    f"{n_vert:>10d}{invalid:>9d}{err:>10.1e}"
                )


if __name__ == "__main__":
    main()

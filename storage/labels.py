"""Label maps: stitching per-tile cluster maps into one sample map, the label codes and the palette.

Label values (the same in the stitched map, the OME-Zarr ``labels/clusters``, the overlay PNG and
the GeoJSON):

* ``0`` (:data:`NO_TISSUE`): no tile, or outside the tissue mask;
* ``k + 1`` for cluster index ``k`` (0-based, as K-means returns it): ``"cluster 1"`` is cluster 0.

Coordinates: a stitched map is at *feature resolution* (``f_`` px), one pixel per ``stride`` analysis
pixels (``l_`` px); its pixel ``(f_row, f_col)`` covers analysis pixels
``[f_col * stride, (f_col + 1) * stride) x [f_row * stride, (f_row + 1) * stride)`` in (x, y), with
the sample's analysis origin at ``(0, 0)``.

:data:`PALETTE` is the one colour table shared by the overlay, the GeoJSON and the OME-Zarr label
colours: ``PALETTE[v]`` is the RGB colour of label value ``v``.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Any

import numpy as np

from equislide.arrays import array_module

__all__ = [
    "NO_TISSUE",
    "PALETTE",
    "label_color",
    "label_dtype",
    "stitch_image",
    "stitch_labels",
    "stitch_store",
    "TilePlane",
    "downsample_plane",
    "tile_plane",
]

#: Label value of "no tissue" (no tile there, or outside the tissue mask).
NO_TISSUE = 0

_BASE = (
    (0, 0, 0),  # 0: no tissue (drawn transparent)
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)


def _extend(n: int) -> tuple[tuple[int, int, int], ...]:
    out = list(_BASE)
    i = 0
    while len(out) < n:
        h = (i * 0.618033988749895) % 1.0  # golden-ratio hues: distinct, deterministic
        r, g, b = colorsys.hsv_to_rgb(h, 0.65 if i % 2 else 0.9, 0.95 if i % 3 else 0.75)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
        i += 1
    return tuple(out)


#: RGB colour of each label value (index = label value; 0 = no tissue). 256 entries: enough for uint8.
PALETTE: tuple[tuple[int, int, int], ...] = _extend(256)


def label_color(value: int) -> tuple[int, int, int]:
    """RGB colour of label value ``value`` (cycles past the end of :data:`PALETTE`, skipping 0)."""
    value = int(value)
    if value < 0:
        raise ValueError(f"label value {value} must be >= 0")
    if value < len(PALETTE):
        return PALETTE[value]
    return PALETTE[1 + (value - 1) % (len(PALETTE) - 1)]


def label_dtype(max_value: int) -> np.dtype:
    """Smallest unsigned dtype (uint8, uint16) holding label values up to ``max_value``."""
    if max_value <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_value <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    raise ValueError(f"{max_value} label values do not fit uint16; use fewer clusters")


def _check_coords(coords: np.ndarray, n: int, stride: int, name: str) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.shape != (n, 2) or not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(
            f"coords must be an integer ({n}, 2) array of (l_x, l_y), got {coords.dtype} {coords.shape}"
        )
    if (coords < 0).any():
        raise ValueError("coords - l_origin must be >= 0 (analysis px from the output's origin)")
    if stride <= 0 or (coords % stride).any():
        raise ValueError(
            f"every coordinate must be a multiple of {name}={stride} (tiles on the feature grid)"
        )
    return coords.astype(np.int64)


def stitch_labels(
    tile_labels: np.ndarray,
    coords: np.ndarray,
    *,
    stride: int,
    shape: tuple[int, int] | None = None,
    tissue_mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
    mask_origin: tuple[float, float] = (0.0, 0.0),
    l_origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Stitch per-tile cluster maps into one label map at feature resolution.

    Args:
        tile_labels: int ``(n_tiles, f_h, f_w)`` cluster indices (0-based) of each tile's interior,
            halo already cropped; negative values mean "no tissue" there. numpy, or cupy to stitch on the GPU
            (:func:`equislide.arrays.array_module`: the map is then a cupy array too).
        coords: int ``(n_tiles, 2)`` interior top-left ``(l_x, l_y)`` of each tile in analysis px (as in
            the tile store); ``coords - l_origin`` must be >= 0 and multiples of ``stride``.
        stride: Analysis px per feature px.
        shape: ``(f_rows, f_cols)`` of the output; default: just large enough for every tile.
        tissue_mask: Optional ``(H, W)`` mask (nonzero = tissue); label pixels whose centre falls on a
            zero mask pixel (nearest sampling) become :data:`NO_TISSUE`.
        mask_downsample: Analysis px per mask px (the store's ``tissue_mask.attrs["downsample"]``).
        mask_origin: ``(l_x, l_y)`` of the mask's pixel ``(0, 0)`` corner in analysis px (the store's
            ``attrs["equislide"]["tissue_mask_l_origin"]``, ``(0, 0)`` for a whole slide).
        l_origin: ``(l_x, l_y)`` of the output's pixel ``(0, 0)`` corner (e.g. a TMA core's first tile).

    Returns:
        ``(f_rows, f_cols)`` uint8 (uint16 past 254 clusters): ``k + 1`` for cluster ``k``, 0 elsewhere.
        Where tiles overlap, the later tile wins.
    """
    xp = array_module(tile_labels, tissue_mask)
    tile_labels = xp.asarray(tile_labels)
    if tile_labels.ndim != 3 or not np.issubdtype(tile_labels.dtype, np.integer):
        raise ValueError(
            f"tile_labels must be integer (n_tiles, h, w), got {tile_labels.dtype} {tile_labels.shape}"
        )
    n, fh, fw = tile_labels.shape
    coords = _check_coords(np.asarray(coords) - np.asarray(l_origin, dtype=np.int64), n, stride, "stride")
    f_xy = coords // stride
    if shape is None:
        shape = (int((f_xy[:, 1].max() + fh) if n else 0), int((f_xy[:, 0].max() + fw) if n else 0))
    top = int(tile_labels.max()) + 1 if n else 0
    out = xp.full(shape, NO_TISSUE, dtype=label_dtype(max(top, 1)))
    for i in range(n):
        fx, fy = int(f_xy[i, 0]), int(f_xy[i, 1])
        y1, x1 = min(fy + fh, shape[0]), min(fx + fw, shape[1])
        if fy >= shape[0] or fx >= shape[1]:
            continue
        block = tile_labels[i, : y1 - fy, : x1 - fx]
        out[fy:y1, fx:x1] = xp.where(block >= 0, block + 1, NO_TISSUE)
    if tissue_mask is not None:
        if mask_downsample is None or not float(mask_downsample) > 0:
            raise ValueError(f"mask_downsample={mask_downsample!r} must be > 0 when a tissue_mask is given")
        rel = (float(mask_origin[0]) - l_origin[0], float(mask_origin[1]) - l_origin[1])
        out[~_sample_mask(xp.asarray(tissue_mask) != 0, shape, stride, float(mask_downsample), rel)] = (
            NO_TISSUE
        )
    return out


def _sample_mask(
    mask: np.ndarray, shape: tuple[int, int], stride: int, downsample: float, origin: tuple[float, float]
) -> np.ndarray:
    """Nearest sample of ``mask`` at the centre of every feature pixel; outside the mask is False.

    A centre that falls exactly on the edge between two mask pixels (a mask at twice the label
    resolution, say) takes either of them (logical or): a plain ``floor`` would always pick the
    right / lower one, and the map of a mirrored or rotated slide would then not be the mirrored or
    rotated map.
    """
    xp = array_module(mask)

    def neighbours(centres: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = centres / downsample
        upper = np.floor(u).astype(np.int64)
        on_edge = np.abs(u - np.rint(u)) < 1e-9
        lower = np.where(on_edge, upper - 1, upper)
        inside = ((lower >= 0) & (lower < n)) | ((upper >= 0) & (upper < n))
        return np.clip(lower, 0, n - 1), np.clip(upper, 0, n - 1), inside

    y0, y1, ok_y = neighbours((np.arange(shape[0]) + 0.5) * stride - origin[1], mask.shape[0])
    x0, x1, ok_x = neighbours((np.arange(shape[1]) + 0.5) * stride - origin[0], mask.shape[1])
    out = xp.zeros(shape, bool)
    y0, y1, ok_y, x0, x1, ok_x = (xp.asarray(a) for a in (y0, y1, ok_y, x0, x1, ok_x))
    for ys in (y0, y1):
        for xs in (x0, x1):
            out |= mask[ys][:, xs]
    return out & ok_y[:, None] & ok_x[None, :]


def stitch_image(
    tiles: np.ndarray,
    coords: np.ndarray,
    *,
    halo: int,
    downsample: int = 1,
    shape: tuple[int, int] | None = None,
    background: int = 255,
    l_origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Stitch RGB tile interiors into one image, optionally downsampled by block means.

    Used for OME-Zarr images and overlay thumbnails; with ``downsample`` equal to the feature stride the
    image lies on the same grid as :func:`stitch_labels`' output.

    Args:
        tiles: uint8 ``(n_tiles, T, T, 3)`` with halo (as stored); numpy or zarr.
        coords: int ``(n_tiles, 2)`` interior top-left ``(l_x, l_y)``; ``coords - l_origin`` must be
            >= 0 and multiples of ``downsample``.
        halo: Halo of the stored tiles (cropped here).
        downsample: Analysis px per output px; the tile interior must be a multiple of it.
        shape: ``(rows, cols)`` of the output; default: just large enough for every tile.
        background: Grey level where there is no tile (255: white, like glass).
        l_origin: ``(l_x, l_y)`` of the output's pixel ``(0, 0)`` corner.

    Returns:
        uint8 ``(rows, cols, 3)``.
    """
    n = int(tiles.shape[0])
    coords = _check_coords(
        np.asarray(coords) - np.asarray(l_origin, dtype=np.int64), n, downsample, "downsample"
    )
    side = int(tiles[0].shape[0]) - 2 * halo if n else 0
    if n and (side <= 0 or side % downsample):
        raise ValueError(f"tile interior {side} px must be a positive multiple of downsample={downsample}")
    o = side // downsample
    xy = coords // downsample
    if shape is None:
        shape = (int(xy[:, 1].max() + o) if n else 0, int(xy[:, 0].max() + o) if n else 0)
    out = np.full((*shape, 3), background, np.uint8)
    for i in range(n):
        x, y = int(xy[i, 0]), int(xy[i, 1])
        if y >= shape[0] or x >= shape[1]:
            continue
        inner = np.asarray(tiles[i])[halo : halo + side, halo : halo + side].astype(np.float32)
        if downsample > 1:
            inner = inner.reshape(o, downsample, o, downsample, 3).mean(axis=(1, 3))
        y1, x1 = min(y + o, shape[0]), min(x + o, shape[1])
        out[y:y1, x:x1] = np.rint(inner[: y1 - y, : x1 - x]).astype(np.uint8)
    return out


class TilePlane:
    """A lazy rectangle of the analysis plane, stitched from stored tiles' interiors a band at a time.

    ``plane[y0:y1]`` (numpy row slicing; a column slice may follow) stitches only the tiles that the
    rows meet, so an OME-Zarr or overlay writer streams a slide of any size in bounded memory. Pixel
    ``(row, col)`` is analysis pixel ``(l_x, l_y) = l_origin + (col, row)``; pixels no tile interior
    covers are ``background``. Where interiors overlap, the later tile wins (as in :func:`stitch_image`).

    Args:
        tiles: ``(n_tiles, T, T, 3)`` uint8 with halo (numpy or a zarr array: read one tile at a time).
        coords: int ``(n_tiles, 2)`` interior top-left ``(l_x, l_y)``.
        halo: Halo of the stored tiles (cropped here).
        rect: ``(l_x0, l_y0, l_x1, l_y1)``, the plane's extent in analysis px (end exclusive).
        background: Grey level where no tile is.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(
        self,
        tiles: Any,
        coords: np.ndarray,
        *,
        halo: int,
        rect: tuple[int, int, int, int],
        background: int = 255,
    ) -> None:
        x0, y0, x1, y1 = (int(v) for v in rect)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"rect={rect} must have l_x1 > l_x0 and l_y1 > l_y0")
        self._tiles = tiles
        self._coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self._halo = int(halo)
        self._side = int(tiles.shape[1]) - 2 * self._halo if len(self._coords) else 0
        self.l_origin = (x0, y0)
        self.shape = (y1 - y0, x1 - x0, 3)
        self._background = int(background)
        self._cache: dict[int, np.ndarray] = {}
        c = self._coords
        self._in_cols = (c[:, 0] < x1) & (c[:, 0] + self._side > x0)

    def __repr__(self) -> str:
        return f"TilePlane(l_origin={self.l_origin}, shape={self.shape}, n_tiles={len(self._coords)})"

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows = key[0]
        if not isinstance(rows, slice) or rows.indices(self.shape[0])[2] != 1:
            raise IndexError("TilePlane reads contiguous row slices: plane[y0:y1] or plane[y0:y1, x0:x1]")
        start, stop, _ = rows.indices(self.shape[0])
        return self.read_rows(start, stop)[0][(slice(None), *key[1:])]

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[start, stop)``: ``(rgb (rows, W, 3) uint8, covered (rows, W) bool)``."""
        stop = max(start, min(stop, self.shape[0]))
        (x0, y0), w = self.l_origin, self.shape[1]
        out = np.full((stop - start, w, 3), self._background, np.uint8)
        covered = np.zeros((stop - start, w), bool)
        ly0, ly1 = y0 + start, y0 + stop
        c, side = self._coords, self._side
        hit = np.flatnonzero(self._in_cols & (c[:, 1] < ly1) & (c[:, 1] + side > ly0))
        # A tile spans several bands: keep the ones this band read for the next band, drop the rest.
        self._cache = {int(i): self._interior(int(i)) for i in hit}
        for i in hit:
            tx, ty = int(c[i, 0]), int(c[i, 1])
            ya, yb = max(ty, ly0), min(ty + side, ly1)
            xa, xb = max(tx, x0), min(tx + side, x0 + w)
            block = self._cache[int(i)][ya - ty : yb - ty, xa - tx : xb - tx]
            out[ya - ly0 : yb - ly0, xa - x0 : xb - x0] = block
            covered[ya - ly0 : yb - ly0, xa - x0 : xb - x0] = True
        return out, covered

    def _interior(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        h, s = self._halo, self._side
        return np.asarray(self._tiles[i])[h : h + s, h : h + s]


def tile_plane(store_path: str | Path, *, extent: str = "tiles") -> TilePlane:
    """The analysis plane of a finished tile store as a lazy :class:`TilePlane`.

    Args:
        store_path: ``<root>/<sample_id>.zarr`` (finished).
        extent: ``"tiles"``: the tile interiors' bounding box (the label grid of :func:`stitch_store`),
            cut to the slide's rectangle when the store knows its size (a grid centred on the
            tissue reaches past the slide's edges, where readers padded white); ``"slide"``: the whole
            slide's rectangle ``[0, ceil(l0_w / l0_per_l_x)) x [0, ...)`` (falls back to ``"tiles"``
            when the size is not stored).
    """
    import zarr

    from equislide.storage.tile_store import open_finished

    if extent not in ("tiles", "slide"):
        raise ValueError(f"extent={extent!r} must be 'tiles' or 'slide'")
    group, meta = open_finished(store_path)
    coords = np.asarray(group["coords"][:], dtype=np.int64)
    tiles = zarr.open_group(zarr.storage.LocalStore(store_path, read_only=True), mode="r")["tiles"]
    halo = int(meta["halo"])
    side = int(tiles.shape[1]) - 2 * halo
    if len(coords):
        rect = [int(coords[:, 0].min()), int(coords[:, 1].min())]
        rect += [int(coords[:, 0].max()) + side, int(coords[:, 1].max()) + side]
    else:
        rect = [0, 0, 1, 1]
    slide = _slide_rect(meta)
    if slide is not None:
        if extent == "slide":
            rect = list(slide)
        else:
            cut = [max(rect[0], slide[0]), max(rect[1], slide[1])]
            cut += [min(rect[2], slide[2]), min(rect[3], slide[3])]
            if cut[2] > cut[0] and cut[3] > cut[1]:
                rect = cut
    return TilePlane(tiles, coords, halo=halo, rect=tuple(rect))


def downsample_plane(
    plane: Any, factor: int, *, band_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``factor x factor`` block means of a (lazy) plane, read ``band_rows * factor`` rows at a time
    (default: about 4 Mpx of the plane per band, whatever its width and the factor).

    Returns:
        ``(rgb (ceil(H / factor), ceil(W / factor), 3) uint8, covered bool)``: ``covered`` is True
        where most of the block lies on stored tiles (always True for a plain array). Edges are
        replicated into the last, partial block.
    """
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor={factor} must be >= 1")
    h, w = int(plane.shape[0]), int(plane.shape[1])
    oh, ow = -(-h // factor), -(-w // factor)
    if band_rows is None:
        band_rows = max(1, (1 << 22) // (max(w, 1) * factor))
    rgb = np.empty((oh, ow, 3), np.uint8)
    covered = np.ones((oh, ow), bool)
    for o0 in range(0, oh, band_rows):
        o1 = min(o0 + band_rows, oh)
        y0, y1 = o0 * factor, min(o1 * factor, h)
        if isinstance(plane, TilePlane):
            band, cov = plane.read_rows(y0, y1)
        else:
            band, cov = np.asarray(plane[y0:y1]), None
        if factor == 1:
            rgb[o0:o1] = band
            if cov is not None:
                covered[o0:o1] = cov
            continue
        pad = ((0, (o1 - o0) * factor - band.shape[0]), (0, ow * factor - w))
        full = np.pad(band, (*pad, (0, 0)), mode="edge")
        if factor & (factor - 1) == 0:
            rgb[o0:o1] = _round_half_even(_pow2_block_sums(full, factor), factor * factor)
        else:
            blocks = full.astype(np.float32).reshape(o1 - o0, factor, ow, factor, 3)
            rgb[o0:o1] = np.rint(blocks.mean(axis=(1, 3)))
        if cov is not None:
            # share >= 1/2, in integers: exactly the float test, without a float pass over the band
            flags = np.pad(cov, pad)
            if factor & (factor - 1) == 0:
                count = _pow2_block_sums(flags.view(np.uint8), factor)
            else:
                count = flags.reshape(o1 - o0, factor, ow, factor).sum(axis=(1, 3), dtype=np.int64)
            covered[o0:o1] = 2 * count.astype(np.int64) >= factor * factor
    return rgb, covered


def _pow2_block_sums(a: np.ndarray, factor: int) -> np.ndarray:
    """Sums of ``factor x factor`` blocks of an (H, W, ...) uint8 array, ``factor`` a power of two, by
    adding neighbour pairs log2(factor) times per axis: whole-array adds, about 10x numpy's reduction
    over a 5-D reshape (what one overlay's picture of a whole slide spent most of its 1.6 s in)."""
    out = a.astype(np.uint32) if factor > 16 else a.astype(np.uint16)  # 255 * 16 * 16 fits 16 bits
    step = 1
    while step < factor:
        out = out[0::2] + out[1::2]
        out = out[:, 0::2] + out[:, 1::2]
        step *= 2
    return out


def _round_half_even(sums: np.ndarray, count: int) -> np.ndarray:
    """``np.rint(sums / count)`` as uint8 for a power-of-two ``count`` (so the float mean is exact)."""
    q, r = np.divmod(sums.astype(np.int64), count)
    half = count // 2
    return (q + ((r > half) | ((r == half) & (q % 2 == 1)))).astype(np.uint8)


def _slide_rect(meta: dict[str, Any]) -> tuple[int, int, int, int] | None:
    dims, per = meta.get("source_dimensions"), meta.get("l0_per_l")
    if not dims or not per:
        return None
    # The tiling's own analysis size (tiling.layout): a partly covered last pixel still shows slide.
    w = math.ceil(float(dims[0]) / float(per[0]))
    h = math.ceil(float(dims[1]) / float(per[1]))
    return (0, 0, max(w, 1), max(h, 1))


def stitch_store(
    store_path: str | Path,
    tile_labels: np.ndarray,
    *,
    stride: int,
    image: bool = True,
    overlay_max: int | None = None,
) -> dict[str, Any]:
    """Stitch a finished tile store's cluster maps (and its image on the same grid) in one call.

    Reads ``coords``, the tissue mask (with its ``downsample`` and ``tissue_mask_l_origin``), ``halo`` and
    ``l0_per_l`` from the store; the output's origin is the first tile's corner (``coords.min(0)``), so a
    TMA core's map is no larger than the core.

    Args:
        store_path: ``<root>/<sample_id>.zarr`` (finished).
        tile_labels: int ``(n_tiles, f_h, f_w)`` cluster indices per tile, in the store's tile order.
        stride: Analysis px per feature px.
        image: Also stitch the RGB image at ``stride`` (same shape as the label map).
        overlay_max: Also stitch ``"overlay_image"``: the same area at the finest power-of-two
            downsample (1 up to ``stride``) whose longest side is at most this many px, so overlays are
            not drawn at feature resolution (a TMA core is ~10 feature px at layer 4); the label map
            scales onto it by a whole factor.

    Returns:
        ``{"labels", "tissue", "image" (or None), "overlay_image" (or None), "l_origin" (l_x, l_y),
        "l0_origin" (l0_x, l0_y), "l0_per_l" (x, y), "pixel_size_um" (µm per label px)}``; ``tissue``
        is the mask (uint8 0/1) on the label grid. Feed ``labels`` / ``image`` / ``tissue`` to
        ``write_ome_zarr`` and
        ``labels_to_geojson(labels, stride=stride, l0_per_l=..., l0_offset=l0_origin)``.
    """
    import zarr

    from equislide.storage.tile_store import open_finished

    group, meta = open_finished(store_path)
    coords = np.asarray(group["coords"][:])
    n = len(coords)
    l_origin = (int(coords[:, 0].min()), int(coords[:, 1].min())) if n else (0, 0)
    mask = down = None
    if "tissue_mask" in group:
        mask = np.asarray(group["tissue_mask"][:])
        down = float(group["tissue_mask"].attrs["downsample"])
    mask_origin = tuple(meta.get("tissue_mask_l_origin") or (0.0, 0.0))
    tile_labels = np.asarray(tile_labels)
    kwargs = {"stride": stride, "l_origin": l_origin}
    labels = stitch_labels(
        tile_labels, coords, tissue_mask=mask, mask_downsample=down, mask_origin=mask_origin, **kwargs
    )
    ones = np.zeros_like(tile_labels, dtype=np.int64)
    tissue = stitch_labels(
        ones,
        coords,
        shape=labels.shape,
        tissue_mask=mask,
        mask_downsample=down,
        mask_origin=mask_origin,
        **kwargs,
    )
    tiles = None
    if image or overlay_max:
        tiles = zarr.open_group(zarr.storage.LocalStore(store_path, read_only=True), mode="r")["tiles"]
    rgb = overlay = None
    if image:
        rgb = stitch_image(
            tiles, coords, halo=int(meta["halo"]), downsample=stride, shape=labels.shape, l_origin=l_origin
        )
    if overlay_max:
        side, extent = int(meta["tile"]), max(labels.shape) * stride
        fits = [d for d in (2**k for k in range(12)) if d <= stride and stride % d == 0 and side % d == 0]
        down = next((d for d in fits if extent <= overlay_max * d), stride)
        if down == stride and rgb is not None:
            overlay = rgb
        else:
            shape = (labels.shape[0] * stride // down, labels.shape[1] * stride // down)
            overlay = stitch_image(
                tiles, coords, halo=int(meta["halo"]), downsample=down, shape=shape, l_origin=l_origin
            )
    return {
        "labels": labels,
        "tissue": tissue,
        "image": rgb,
        "overlay_image": overlay,
        **map_placement(meta, l_origin, stride),
    }


def map_placement(meta: dict[str, Any], l_origin: tuple[int, int], stride: int) -> dict[str, Any]:
    """Where a stitched map sits on the slide: ``l_origin``, ``l0_origin``, ``l0_per_l`` (level-0 pixels
    per analysis pixel, from the store's metadata or its mpp ratio) and ``pixel_size_um`` of one map pixel."""
    l0_per_l = meta.get("l0_per_l")
    if l0_per_l is None:
        mpp, src = meta.get("mpp"), meta.get("source_mpp")
        ratio = float(mpp) / float(src) if mpp and src else 1.0
        l0_per_l = [ratio, ratio]
    l0_per_l = (float(l0_per_l[0]), float(l0_per_l[1]))
    mpp = meta.get("mpp")
    return {
        "l_origin": l_origin,
        "l0_origin": (l_origin[0] * l0_per_l[0], l_origin[1] * l0_per_l[1]),
        "l0_per_l": l0_per_l,
        "pixel_size_um": float(mpp) * stride if mpp else None,
    }

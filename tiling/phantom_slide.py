"""A large synthetic H&E whole slide, streamed tile by tile, with low-resolution ground truth.

:func:`write_whole_slide_phantom` writes three files beside each other:

- ``<out>``: a pyramidal tiled TIFF (512 x 512 JPEG tiles, YCbCr 4:2:0, successive IFDs, reduced levels
  marked ``NewSubfileType=1``, each level half the one above down to at most 1024 px a side) that
  OpenSlide 4 opens as ``generic-tiff``, with the mpp in the resolution tags (``openslide.mpp-x``).
- ``<out stem>.truth.png``: the uint8 label map (:data:`~equislide.tiling.phantom.LABEL_NAMES`) at
  ``label_downsample`` level-0 pixels per pixel (about 16 µm); truth pixel ``(l_x, l_y)`` is the label at
  level-0 pixel ``(l_x * d + d // 2, l_y * d + d // 2)``, as in the TMA phantom.
- ``<out stem>.json``: what :class:`PhantomSlideInfo` holds (sizes, mpp, levels, pieces, class names, seed).

The section is a few irregular tissue pieces (elongated, lobed outlines with a frayed edge, sizes and
places jittered so they never form a lattice a TMA detector would take for cores) on near-white glass.
Each piece is a warped Voronoi partition into the TMA phantom's four tissue classes, all four in every
piece. Why it can be fast and flat in memory:

- The partition is a closed-form function of position (per-piece tables over angle for the outline, a
  knot-grid noise for the warp, a handful of seed points), evaluated per tile on a grid of ~2 µm blocks.
  Nothing of slide size is ever held: memory is one tile, the texture atlases and the tile cache.
- The textures are the TMA phantom's own painters (``tiling/phantom.py``), rendered once per class on a
  1024 px square at the slide's mpp and mirrored into a seamless periodic 2048 px atlas. A region shows
  its class's atlas at its own seeded offset. Textures therefore repeat with a period of 2048 level-0 px
  (512 µm at 0.25 µm/px). One stain strength for the whole section: it was stained in one bath.
- Every level is rendered at its own scale from the same partition function and the atlas box-downsampled
  to that level, so level ``k`` equals a 2^k box downsample of level 0 except within a block of a region
  edge; no level is derived from a stored level above it.
- Glass tiles are one JPEG encoded once; a tile inside one region is one of few atlas positions, so its
  JPEG is cached per (region, position); only tiles on an edge are composed and encoded.

What it does not look like: textures mirror at the atlas period (fibres meet in chevrons there), and
edges are steps of 0.5 µm (2 px at 0.25 µm/px: tiles on an edge are evaluated on quarter blocks).
At thumbnail scale fat averages to near-white, and ``tissue_mask`` does not find it.

Measured (``bench/wholeslide_phantom.py``, 0.25 µm/px, the shared 2-core machine under load): 80000 x
60000 px in 67 CPU s (204 s wall), peak RSS 284 MB at every size from 20000 x 15000 up.

The same seed and arguments give byte-identical files on the same platform.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import phantom as _ph
from ._mpp import MAX_EXTENT_MM, MPP_RANGE

__all__ = ["PhantomPiece", "PhantomSlideInfo", "read_whole_slide_phantom_info", "write_whole_slide_phantom"]

_FORMAT = "equislide-phantom-slide/1"
_ATLAS = 1024  # painted side of a class texture (px); mirrored, the period is twice this
_BLOCK_UM = 2.0  # the partition is evaluated on blocks of about this size at levels finer than it
_TRUTH_UM = 16.0
_MIN_SIDE, _MAX_SIDE = 1024, 400_000


@dataclass(frozen=True)
class PhantomPiece:
    """One tissue piece of the whole-slide phantom.

    Attributes:
        l0_x: Centre x in level-0 pixels.
        l0_y: Centre y in level-0 pixels.
        radius_um: Semi-major axis of the piece's ellipse before its lobes and fray, µm.
        aspect: Semi-major over semi-minor axis.
        angle_deg: Direction of the major axis, degrees clockwise on screen (y down) from +x.
        classes: Class (label value) of each Voronoi region, in seed order.
    """

    l0_x: float
    l0_y: float
    radius_um: float
    aspect: float
    angle_deg: float
    classes: tuple[int, ...]


@dataclass(frozen=True)
class PhantomSlideInfo:
    """What :func:`write_whole_slide_phantom` wrote; the same content as the ``.json`` beside the image.

    Attributes:
        image_path: The pyramidal TIFF.
        truth_path: The uint8 label map PNG at ``label_downsample``.
        json_path: The JSON description.
        seed: Seed of the generator.
        mpp: Microns per level-0 pixel.
        l0_size: Level-0 ``(width, height)`` in pixels.
        level_count: Pyramid levels (each halves the previous one).
        tile: Tile side of every level, px.
        jpeg_quality: JPEG quality of the tiles.
        texture_period: Level-0 px after which a region's texture repeats.
        pieces: The tissue pieces.
        label_names: Class name per label value (index = value).
        label_downsample: Level-0 pixels per truth pixel along x and y.
    """

    image_path: Path
    truth_path: Path
    json_path: Path
    seed: int
    mpp: float
    l0_size: tuple[int, int]
    level_count: int
    tile: int
    jpeg_quality: int
    texture_period: int
    pieces: tuple[PhantomPiece, ...]
    label_names: tuple[str, ...]
    label_downsample: int

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON form: file names relative to the JSON's folder, so the folder can move."""
        return {
            "format": _FORMAT,
            "image": self.image_path.name,
            "truth": self.truth_path.name,
            "seed": self.seed,
            "mpp": self.mpp,
            "l0_width": self.l0_size[0],
            "l0_height": self.l0_size[1],
            "level_count": self.level_count,
            "tile": self.tile,
            "jpeg_quality": self.jpeg_quality,
            "texture_period": self.texture_period,
            "label_downsample": self.label_downsample,
            "label_names": {str(i): n for i, n in enumerate(self.label_names)},
            "pieces": [
                {
                    "l0_x": p.l0_x,
                    "l0_y": p.l0_y,
                    "radius_um": p.radius_um,
                    "aspect": p.aspect,
                    "angle_deg": p.angle_deg,
                    "classes": list(p.classes),
                }
                for p in self.pieces
            ],
        }


def read_whole_slide_phantom_info(json_path: str | Path) -> PhantomSlideInfo:
    """Read the ``.json`` that :func:`write_whole_slide_phantom` wrote.

    Raises:
        ValueError: The file is not a whole-slide phantom description.
    """
    json_path = Path(json_path)
    d = json.loads(json_path.read_text(encoding="utf-8"))
    if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
        raise ValueError(
            f"{json_path} is not an equislide whole-slide phantom description (format != {_FORMAT!r})"
        )
    names = d["label_names"]
    return PhantomSlideInfo(
        image_path=json_path.parent / d["image"],
        truth_path=json_path.parent / d["truth"],
        json_path=json_path,
        seed=int(d["seed"]),
        mpp=float(d["mpp"]),
        l0_size=(int(d["l0_width"]), int(d["l0_height"])),
        level_count=int(d["level_count"]),
        tile=int(d["tile"]),
        jpeg_quality=int(d["jpeg_quality"]),
        texture_period=int(d["texture_period"]),
        pieces=tuple(
            PhantomPiece(**{**p, "classes": tuple(int(c) for c in p["classes"])}) for p in d["pieces"]
        ),
        label_names=tuple(names[str(i)] for i in range(len(names))),
        label_downsample=int(d["label_downsample"]),
    )


def write_whole_slide_phantom(
    path: str | Path,
    *,
    width: int = 80000,
    height: int = 60000,
    mpp: float = 0.25,
    seed: int = 0,
    pieces: int = 5,
    tile: int = 512,
    quality: int = 80,
) -> PhantomSlideInfo:
    """Write a synthetic H&E whole slide, its ground-truth label map and its JSON description.

    Args:
        path: Path of the pyramidal TIFF to write (``.tiff``); ``<stem>.truth.png`` and ``<stem>.json``
            go beside it. The TIFF is written under a temporary name and renamed when complete.
        width: Level-0 width in px.
        height: Level-0 height in px.
        mpp: Microns per level-0 pixel.
        seed: Seed; the same seed and arguments give byte-identical files.
        pieces: Tissue pieces (1-32).
        tile: Tile side in px (a multiple of 16, 128-2048).
        quality: JPEG quality of the tiles (1-100).

    Returns:
        The :class:`PhantomSlideInfo` that is also written as ``<stem>.json``.

    Raises:
        ValueError: An argument is out of range (the message names it).
    """
    import tifffile

    out = Path(path)
    _check_args(width, height, mpp, pieces, tile, quality)
    rng = np.random.default_rng([seed, 100])
    layout = _layout_pieces(rng, width, height, mpp, pieces)
    level_sizes = [(width, height)]
    while max(level_sizes[-1]) > 1024 and min(level_sizes[-1]) >= 2:
        w, h = level_sizes[-1]
        level_sizes.append((max(1, w // 2), max(1, h // 2)))
    d = 1 << max(0, round(math.log2(_TRUTH_UM / mpp)))
    info = PhantomSlideInfo(
        image_path=out,
        truth_path=out.with_name(out.stem + ".truth.png"),
        json_path=out.with_name(out.stem + ".json"),
        seed=int(seed),
        mpp=float(mpp),
        l0_size=(int(width), int(height)),
        level_count=len(level_sizes),
        tile=int(tile),
        jpeg_quality=int(quality),
        texture_period=2 * _ATLAS,
        pieces=tuple(p.public for p in layout),
        label_names=_ph.LABEL_NAMES,
        label_downsample=d,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atlas = _class_atlases(np.random.default_rng([seed, 200]), mpp)
    px_per_cm = 1e4 / mpp
    partial = out.with_name(out.name + ".partial")
    try:
        with tifffile.TiffWriter(partial, bigtiff=width * height * 3 > 2**31) as tw:
            for k, (lw, lh) in enumerate(level_sizes):
                if k:
                    atlas = {c: _ph._half(a) for c, a in atlas.items()}  # a periodic image halves to one
                tw.write(
                    _level_tiles(layout, atlas, k, lw, lh, mpp, tile, quality),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    photometric="rgb",
                    tile=(tile, tile),
                    compression="jpeg",
                    resolution=(px_per_cm / 2**k, px_per_cm / 2**k),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if k else 0,
                    description=f"equislide whole-slide phantom seed={seed} mpp={mpp}" if k == 0 else None,
                    software="equislide",
                    metadata=None,
                )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    _write_truth(info.truth_path, layout, width, height, mpp, d)
    info.json_path.write_text(json.dumps(info.to_json_dict(), indent=2) + "\n", encoding="utf-8")
    return info


def _check_args(width, height, mpp, pieces, tile, quality) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, (int, np.integer)) or not _MIN_SIDE <= v <= _MAX_SIDE:
            raise ValueError(f"{name}={v} must be an integer in {_MIN_SIDE}..{_MAX_SIDE} px")
    if not (isinstance(mpp, (int, float)) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise ValueError(f"mpp={mpp} must be in {MPP_RANGE[0]}..{MPP_RANGE[1]} µm/px")
    extent = max(width, height) * mpp / 1000
    if extent > MAX_EXTENT_MM:
        raise ValueError(
            f"{width} x {height} px at mpp={mpp} is {extent:.0f} mm wide, over one glass slide's "
            f"{MAX_EXTENT_MM:.0f} mm (readers would reject its mpp); lower the size or the mpp"
        )
    if not 1 <= pieces <= 32:
        raise ValueError(f"pieces={pieces} must be in 1..32")
    if tile % 16 or not 128 <= tile <= 2048:
        raise ValueError(f"tile={tile} must be a multiple of 16 in 128..2048 (JPEG 4:2:0 blocks)")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality} must be in 1..100")


# --------------------------------------------------------------------------------------------------------
# The partition: a closed-form function of position, in µm from the slide's top left.


class _Piece:
    """One piece's outline and regions, evaluated at any points (µm)."""

    def __init__(self, rng, cx: float, cy: float, radius: float, aspect: float, angle: float) -> None:
        self.cx, self.cy, self.radius, self.aspect, self.angle = cx, cy, radius, aspect, angle
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        n_ang = 4096
        ang = np.linspace(0, 2 * np.pi, n_ang, endpoint=False)
        edge = np.ones(n_ang)
        for k in range(2, 7):  # lobes
            edge += rng.normal(0, 0.10 / k) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
        arc = 2 * np.pi * radius / n_ang  # µm of outline per table entry (at the major axis)
        edge += _ph._noise_1d(rng, n_ang, 150 / arc) * (40 / radius)  # ragged, ~150 µm
        edge += _ph._noise_1d(rng, n_ang, 20 / arc) * (8 / radius)  # frayed, ~20 µm
        self.edge = np.maximum(edge, 0.3).astype(np.float32)
        self.n_ang = n_ang
        self.reach = radius * float(self.edge.max()) + 1.0  # µm: nothing of the piece lies further out
        n = int(rng.integers(4, 8))
        self.classes = np.concatenate([rng.permutation(4) + 1, rng.integers(1, 5, n - 4)]).astype(np.uint8)
        # Seeds spread over the ellipse (piece frame: u along the major axis, v across, both / radius).
        rr = np.sqrt(rng.uniform(0.02, 0.6, n))
        tt = rng.uniform(0, 2 * np.pi, n)
        self.su = (rr * np.cos(tt)).astype(np.float32)
        self.sv = (rr * np.sin(tt) / aspect).astype(np.float32)
        self.warp_pitch = 0.35 / aspect  # knot pitch of the warp, in units of radius
        m = int(math.ceil(2.4 / self.warp_pitch)) + 5
        self.knots = (np.arange(m) - 2) * self.warp_pitch - 1.2
        self.gu = rng.standard_normal((m, m)).astype(np.float32) * np.float32(0.16 / aspect)
        self.gv = rng.standard_normal((m, m)).astype(np.float32) * np.float32(0.16 / aspect)
        self.offsets = rng.integers(0, 2 * _ATLAS, (n, 2))  # texture offset (x, y) of each region, level-0 px
        self.public: PhantomPiece | None = None  # what the JSON says of it, set by the layout

    def bbox(self) -> tuple[float, float, float, float]:
        return self.cx - self.reach, self.cy - self.reach, self.cx + self.reach, self.cy + self.reach

    def _basis(self, q: np.ndarray) -> np.ndarray:
        b = np.exp(-0.5 * ((q[:, None] - self.knots[None, :]) / (0.8 * self.warp_pitch)) ** 2)
        return (b / np.sqrt((b**2).sum(axis=1, keepdims=True) + 1e-12)).astype(np.float32)

    def regions(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Region index + 1 (0 off the piece) at the grid ``y_um`` (rows) x ``x_um`` (columns)."""
        dx = ((x_um - self.cx) / self.radius).astype(np.float32)[None, :]
        dy = ((y_um - self.cy) / self.radius).astype(np.float32)[:, None]
        u = dx * np.float32(self.cos) + dy * np.float32(self.sin)
        v = dy * np.float32(self.cos) - dx * np.float32(self.sin)
        r = np.sqrt(u * u + (v * np.float32(self.aspect)) ** 2)
        a_idx = ((np.arctan2(v, u) + np.float32(np.pi)) * np.float32(self.n_ang / (2 * np.pi))).astype(
            np.int32
        )
        a_idx &= self.n_ang - 1
        inside = r < self.edge[a_idx]
        lab = np.zeros(inside.shape, np.uint8)
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if rows.size == 0:
            return lab
        # Only the box around the piece's own points needs the partition.
        box = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
        dx, dy, u, v, inside = dx[:, box[1]], dy[box[0], :], u[box], v[box], inside[box]
        # The warp is separable in the slide's axes (a knot grid in x and y), so a block grid costs two
        # small matrix products, not a per-point sum.
        bx, by = self._basis(np.asarray(dx[0], np.float64)), self._basis(np.asarray(dy[:, 0], np.float64))
        wu = u + (by @ self.gu) @ bx.T
        wv = v + (by @ self.gv) @ bx.T
        best = np.full(u.shape, np.inf, np.float32)
        sub = np.zeros(u.shape, np.uint8)
        for k in range(self.su.size):
            d2 = (wu - self.su[k]) ** 2 + (wv - self.sv[k]) ** 2
            closer = d2 < best
            np.minimum(d2, best, out=best)
            sub[closer] = k + 1
        sub *= inside
        lab[box] = sub
        return lab


def _layout_pieces(rng, width: int, height: int, mpp: float, n: int) -> list[_Piece]:
    """One large section and ``n - 1`` smaller fragments, placed at random without overlapping.

    Sizes spread widely and places follow no grid, as on a real slide; pieces of one size on a lattice
    are what the TMA detector looks for (``tiling.tma.is_tma``), and a section must not pass for cores.
    """
    w_um, h_um = width * mpp, height * mpp
    out: list[_Piece] = []
    placed: list[tuple[float, float, float]] = []  # (x, y, reach) in µm
    for i in range(n):
        size = (
            0.40
            * min(w_um, h_um)
            * (float(rng.uniform(0.85, 1.0)) if i == 0 else float(rng.uniform(0.15, 0.5)))
        )
        aspect = float(rng.uniform(1.2, 2.0))
        angle = float(rng.uniform(0, np.pi))
        for _ in range(200):
            radius = size / 1.3  # lobes and fray reach up to ~1.3 radius
            margin = 1.3 * radius
            if 2 * margin >= min(w_um, h_um):
                size *= 0.9
                continue
            cx = float(rng.uniform(margin, w_um - margin))
            cy = float(rng.uniform(margin, h_um - margin))
            # Ellipses of different aspects: the bounding circles keep them apart.
            if all(math.hypot(cx - x, cy - y) > margin + r + 0.02 * min(w_um, h_um) for x, y, r in placed):
                break
            size *= 0.97
        else:
            break  # the slide is full: fewer pieces
        p = _Piece(rng, cx, cy, radius, aspect, angle)
        placed.append((cx, cy, p.reach))
        p.public = PhantomPiece(
            l0_x=round(cx / mpp, 2),
            l0_y=round(cy / mpp, 2),
            radius_um=round(radius, 3),
            aspect=round(aspect, 4),
            angle_deg=round(math.degrees(angle), 4),
            classes=tuple(int(v) for v in p.classes),
        )
        out.append(p)
    return out


def _labels_at(layout: list[_Piece], x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Global region id at the grid (0 glass; piece ``i``'s region ``j`` is ``i * 8 + j + 1``)."""
    ids = np.zeros((y_um.size, x_um.size), np.uint16)
    x0, x1, y0, y1 = x_um[0], x_um[-1], y_um[0], y_um[-1]
    for i, p in enumerate(layout):
        bx0, by0, bx1, by1 = p.bbox()
        if bx1 < x0 or bx0 > x1 or by1 < y0 or by0 > y1:
            continue
        lab = p.regions(x_um, y_um)
        np.copyto(ids, (lab.astype(np.uint16) + np.uint16(i * 8)), where=lab > 0)
    return ids


def _class_of(layout: list[_Piece]) -> np.ndarray:
    table = np.zeros(len(layout) * 8 + 1, np.uint8)
    for i, p in enumerate(layout):
        table[i * 8 + 1 : i * 8 + 1 + p.classes.size] = p.classes
    return table


# --------------------------------------------------------------------------------------------------------
# Textures and tiles


def _class_atlases(rng, mpp: float) -> dict[int, np.ndarray]:
    """A seamless periodic (2A, 2A, 3) uint8 texture per class, painted at ``mpp`` and mirrored."""
    um = 1.0 / mpp
    m = 8  # painted margin, cropped: the blur sees zero beyond the canvas, which would leave pale seams
    a = _ATLAS + 2 * m
    t_x = np.arange(a, dtype=np.float32)[None, :]
    t_y = np.arange(a, dtype=np.float32)[:, None]
    sub = np.ones((a, a), bool)
    painters = {1: _ph._paint_glands, 2: _ph._paint_dense_nuclei, 3: _ph._paint_stroma, 4: _ph._paint_fat}
    out = {}
    for value, paint in painters.items():
        grain = (rng.random((a, a), dtype=np.float32) - np.float32(0.5)) * np.float32(3.4)
        h, e = paint(rng, t_x, t_y, um, grain, sub)
        rgb = _ph._od_to_rgb(_ph._blur121(h), _ph._blur121(e))[m:-m, m:-m]
        # Mirroring makes the texture continuous across the period: no seam where it wraps.
        rgb = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
        out[value] = np.ascontiguousarray(np.concatenate([rgb, rgb[::-1]], axis=0))
    return out


def _padded(a: np.ndarray, n: int) -> np.ndarray:
    """Periodic image ``a`` repeated to (p_y + n, p_x + n): any (n, n) window from (y mod p_y, x mod p_x)
    is then a plain slice, not a gather."""
    p_y, p_x = a.shape[:2]
    reps = (-(-(p_y + n) // p_y), -(-(p_x + n) // p_x), 1)
    return np.ascontiguousarray(np.tile(a, reps)[: p_y + n, : p_x + n])


def _level_tiles(layout, atlas, k, lw, lh, mpp, tile, quality) -> Iterator[bytes]:
    """Encoded JPEG tiles of level ``k`` (``lw`` x ``lh`` px), row-major, as tifffile writes them."""
    import imagecodecs

    def encode(rgb: np.ndarray) -> bytes:
        # The same call tifffile makes for compression="jpeg", photometric="rgb" (4:2:0 YCbCr).
        return imagecodecs.jpeg_encode(
            np.ascontiguousarray(rgb),
            level=quality,
            colorspace="RGB",
            outcolorspace="YCBCR",
            subsampling=(2, 2),
        )

    scale = 2**k
    lv_mpp = mpp * scale
    b = 1 << max(0, round(math.log2(_BLOCK_UM / lv_mpp)))  # block side in level-k px
    b = min(b, tile)
    nb = tile // b
    glass = _ph._od_to_rgb(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))[0, 0]
    glass_tile = np.empty((tile, tile, 3), np.uint8)
    glass_tile[:] = glass
    glass_jpeg = encode(glass_tile)
    class_of = _class_of(layout)
    boxes = np.array([p.bbox() for p in layout])
    period = atlas[1].shape[:2]
    ext = {c: _padded(a, tile) for c, a in atlas.items()}
    cache: dict[tuple[int, int, int], bytes] = {}
    for ty in range(-(-lh // tile)):
        y0 = ty * tile
        # Block centres in µm: level-k pixel x spans level-0 [x * s, (x + 1) * s), centre (x + 0.5) s - 0.5.
        y_um = ((y0 + (np.arange(nb) + 0.5) * b) * scale - 0.5) * mpp
        row_hit = (boxes[:, 1] <= y_um[-1] + b * lv_mpp) & (boxes[:, 3] >= y_um[0] - b * lv_mpp)
        for tx in range(-(-lw // tile)):
            x0 = tx * tile
            if not row_hit.any():
                yield glass_jpeg
                continue
            x_um = ((x0 + (np.arange(nb) + 0.5) * b) * scale - 0.5) * mpp
            ids = _labels_at(layout, x_um.astype(np.float32), y_um.astype(np.float32))
            first = int(ids[0, 0])
            if (ids == first).all():
                if first == 0:
                    yield glass_jpeg
                    continue
                piece, region = divmod(first - 1, 8)
                ox, oy = layout[piece].offsets[region] // scale
                key = (first, int((x0 + ox) % period[1]), int((y0 + oy) % period[0]))
                hit = cache.get(key)
                if hit is None:
                    tex = _region_texture(ext, period, class_of, layout, first, x0, y0, scale, tile)
                    hit = cache[key] = encode(tex)
                yield hit
                continue
            # A tile on an edge: its partition again on blocks a quarter the side, so edges step by at
            # most 0.5 µm (cheap: the coarse blocks already said which tiles need it).
            fb = max(1, b // 4)
            if fb < b:
                nf = tile // fb
                fx = ((x0 + (np.arange(nf) + 0.5) * fb) * scale - 0.5) * mpp
                fy = ((y0 + (np.arange(nf) + 0.5) * fb) * scale - 0.5) * mpp
                ids = _labels_at(layout, fx.astype(np.float32), fy.astype(np.float32))
            else:
                nf = nb
            rgb = glass_tile.copy()
            blocks = rgb.reshape(nf, tile // nf, nf, tile // nf, 3)  # the partition is constant per block
            for rid in np.unique(ids):
                if rid == 0:
                    continue
                tex = _region_texture(ext, period, class_of, layout, int(rid), x0, y0, scale, tile)
                np.copyto(blocks, tex.reshape(blocks.shape), where=(ids == rid)[:, None, :, None, None])
            yield encode(rgb)


def _region_texture(ext, period, class_of, layout, rid, x0, y0, scale, tile) -> np.ndarray:
    """Region ``rid``'s texture on the tile at level pixel (x0, y0): a view into its class's atlas."""
    piece, region = divmod(rid - 1, 8)
    ox, oy = layout[piece].offsets[region] // scale
    y, x = int(y0 + oy) % period[0], int(x0 + ox) % period[1]
    return ext[int(class_of[rid])][y : y + tile, x : x + tile]


def _write_truth(path: Path, layout, width: int, height: int, mpp: float, d: int) -> None:
    from PIL import Image

    class_of = _class_of(layout)
    nx, ny = -(-width // d), -(-height // d)
    x_um = ((np.arange(nx) * d + d // 2) * mpp).astype(np.float32)
    truth = np.zeros((ny, nx), np.uint8)
    for r0 in range(0, ny, 256):  # bands keep the evaluation's temporaries small
        y_um = ((np.arange(r0, min(r0 + 256, ny)) * d + d // 2) * mpp).astype(np.float32)
        truth[r0 : r0 + y_um.size] = class_of[_labels_at(layout, x_um, y_um)]
    Image.fromarray(truth).save(path)

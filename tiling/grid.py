"""Tile grids at the analysis resolution: which tiles cover the tissue, and where to read them.

Coordinate planes (as in ``openslide/deepzoom.py``):

- ``l0_``: pixel (x, y) in the slide's level 0; x to the right, y down.
- ``l_``: pixel (x, y) at the *analysis resolution* (default 2.5 µm/px). One analysis pixel spans
  ``l0_per_l = (analysis mpp / slide mpp_x, analysis mpp / slide mpp_y)`` level-0 pixels, so
  ``l0_x = l_x * l0_per_l[0]``. A slide without a resolution is processed at native pixels:
  ``l0_per_l = (1, 1)`` and the analysis plane *is* level 0.
- ``t_``: (row, col) of a tile in the grid, row-major from the top-left of the grid.
- ``m_``: pixel (x, y) of the tissue mask (a thumbnail); one mask pixel spans ``l_per_m`` analysis
  pixels along (x, y).

A tile has an *interior* of ``tile x tile`` analysis pixels and a *halo* of ``halo`` pixels on every
side, giving the network its receptive field at the interior's border: the stored (and read) tile is
``side = tile + 2 * halo`` square. The grid is centred on the tissue's bounding box (not anchored at
the image's top-left): it has ``ceil(extent / tile)`` tiles along each axis, where ``extent`` is the
box's size in whole analysis pixels, and grid tile ``(t_row, t_col)`` has its interior top-left at
``l_xy = l_origin + (t_col * tile, t_row * tile)``. Interiors tile the box without overlap and halos
overlap their neighbours (and may reach past the image on any side, where the readers return
white). A tile is kept when its *interior* footprint overlaps at least one tissue-mask pixel.

Level-0 equivalents: the interior's top-left is at ``l_xy * l0_per_l`` (float); the read origin,
``l0_read_xy = round((l_xy - halo) * l0_per_l)``, is the integer level-0 pixel where the stored
tile's first pixel starts (so positions are exact to half a level-0 pixel).

TMA cores are stored whole: each core is one tile covering its bounding box plus ``margin`` on every
side, centred on the box, with ``halo = 0`` (the margin is the context). All cores of a slide share
one side, the largest core's, rounded up to a multiple of 8 so that the network's 90-degree
equivariance is exact (three stride-2 stages); the padding this adds is split evenly around the box.

Symmetry: the grids commute with the 8 rotations / flips ``T`` of the square. For a mask ``T(mask)``
of the transformed image (``l_size`` and ``l_per_m`` swapped by a quarter turn), the tiles' interior
squares are ``T`` of the original's, where ``T`` maps x to ``l_w - x`` (a flip) or exchanges x and y,
and tiles come in row-major order of the new grid. A centred origin that falls on half a pixel is
rounded towards the image's centred grid (the one ``T`` leaves in place), the only rule both an
image and its mirror image agree on. Exactness fails only where no integer grid can be symmetric:

- a box centred on the image's centre line with an odd leftover ``l_w - n * tile`` (or ``l_w - side``
  for a core): the image's mirror maps the box to itself, but half a pixel cannot be split; the
  origin is then rounded down, and the mirrored grid is one pixel off;
- ``l_per_m`` or ``l0_per_l`` that are not whole numbers, or an ``l_size`` that is not the mask's own
  size times ``l_per_m``: the mirrored pixel planes do not line up, and rounding to whole (analysis or
  level-0) pixels can land on the other side (half a pixel at most);
- the thumbnail a mask comes from: a slide whose size is not a multiple of the thumbnail downsample
  (or whose pyramid levels were cut at the right and bottom by the scanner) has a thumbnail that
  is not exactly ``T`` of the mirrored slide's; see ``tests/tiling/test_symmetry.py`` for how close.

Everything here is pure numpy: no file is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TileGrid", "analysis_scale", "core_grids", "core_tile_side", "tissue_grid"]


@dataclass(frozen=True, eq=False)
class TileGrid:
    """The tiles of one sample.

    Attributes:
        tile: Interior side in analysis pixels.
        halo: Context pixels on every side of the interior (0 for TMA cores).
        l0_per_l: (x, y) level-0 pixels per analysis pixel.
        l_xy: int64 (n, 2) interior top-left corners (l_x, l_y), analysis pixels.
        t_rc: int64 (n, 2) grid (row, col) of each tile.
        grid_shape: (rows, cols) of the full grid the tiles were chosen from.
        l_origin: (l_x, l_y) of grid tile (0, 0)'s interior top-left (it may be off the image).
    """

    tile: int
    halo: int
    l0_per_l: tuple[float, float]
    l_xy: np.ndarray
    t_rc: np.ndarray
    grid_shape: tuple[int, int]
    l_origin: tuple[int, int] = (0, 0)

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return int(self.l_xy.shape[0])

    @property
    def side(self) -> int:
        """Side of a stored tile, halo included: ``tile + 2 * halo`` analysis pixels."""
        return self.tile + 2 * self.halo

    @property
    def l0_xy(self) -> np.ndarray:
        """float64 (n, 2) level-0 (x, y) of each interior top-left corner."""
        return self.l_xy * np.asarray(self.l0_per_l, dtype=np.float64)

    @property
    def l0_read_xy(self) -> np.ndarray:
        """int64 (n, 2) level-0 (x, y) where each stored tile (halo included) starts."""
        origin = (self.l_xy - self.halo) * np.asarray(self.l0_per_l, dtype=np.float64)
        return np.floor(origin + 0.5).astype(np.int64)


def analysis_scale(slide_mpp: tuple[float, float] | None, mpp: float) -> tuple[float, float]:
    """Level-0 pixels per analysis pixel along (x, y); ``(1, 1)`` when the slide has no resolution.

    Args:
        slide_mpp: (x, y) µm per level-0 pixel, or ``None`` (then the analysis plane is level 0).
        mpp: Analysis resolution, µm per pixel.
    """
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp={mpp!r} must be a positive number of µm per pixel")
    if slide_mpp is None:
        return (1.0, 1.0)
    return (mpp / slide_mpp[0], mpp / slide_mpp[1])


def _check_tile(tile: int, halo: int) -> None:
    if int(tile) != tile or tile < 8:
        raise ValueError(f"tile={tile!r} must be an integer >= 8 (analysis pixels)")
    if int(halo) != halo or halo < 0:
        raise ValueError(f"halo={halo!r} must be an integer >= 0 (analysis pixels)")


#: Slack for float rounding where a scaled coordinate should be a whole number (mask <-> analysis).
_EPS = 1e-9


def _centred_origin(lo: float, hi: float, span: int, size: float) -> int:
    """Whole-pixel start of a ``span`` long run centred on ``[lo, hi)``, mirror-symmetric in ``[0, size)``.

    The centred start ``(lo + hi - span) / 2`` is rounded to the nearest pixel; a half-pixel tie goes
    towards ``(size - span) / 2``, the start of the run centred on the image, so that the mirror
    ``x -> size - x`` of the box gets the mirrored run. A tie at that centre itself cannot be
    mirrored (the leftover ``size - span`` is odd): it is rounded down.
    """
    real = (lo + hi - span) / 2
    below = math.floor(real + _EPS)
    frac = real - below
    if frac < 0.5 - _EPS:
        return below
    if frac > 0.5 + _EPS:
        return below + 1
    image = (size - span) / 2
    if abs(image - real) <= _EPS:
        return below
    return below + 1 if image > real else below


def tissue_grid(
    mask: np.ndarray,
    *,
    l_size: tuple[int, int],
    l_per_m: tuple[float, float],
    tile: int = 512,
    halo: int = 32,
    l0_per_l: tuple[float, float] = (1.0, 1.0),
) -> TileGrid:
    """The grid tiles of a whole slide whose interior overlaps the tissue mask.

    The grid is centred on the tissue's bounding box (see the module docstring), so the grid of a
    rotated or mirrored slide is the rotated or mirrored grid.

    Args:
        mask: (H, W) bool tissue mask (``m_`` plane), covering the whole slide.
        l_size: (width, height) of the slide in analysis pixels (its centre breaks half-pixel ties).
        l_per_m: (x, y) analysis pixels per mask pixel.
        tile: Interior side, analysis pixels.
        halo: Context on every side, analysis pixels.
        l0_per_l: (x, y) level-0 pixels per analysis pixel (recorded in the grid).

    Returns:
        A :class:`TileGrid`, tiles in row-major order; empty (``grid_shape`` (0, 0)) when the mask is.
    """
    _check_tile(tile, halo)
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask of shape {mask.shape} must be 2-D (H, W)")
    l0_per_l = (float(l0_per_l[0]), float(l0_per_l[1]))
    tile = int(tile)
    m_rows, m_cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(m_rows):
        empty = np.zeros((0, 2), np.int64)
        return TileGrid(tile, int(halo), l0_per_l, empty, empty.copy(), (0, 0))
    m_h, m_w = mask.shape
    # The tissue's box in whole analysis pixels (every pixel a tissue mask pixel touches), so the
    # grid covers it whatever the rounding of its origin.
    origin, shape = [], []
    for m_lo, m_hi, scale, size in (
        (m_cols[0], m_cols[-1] + 1, l_per_m[0], l_size[0]),
        (m_rows[0], m_rows[-1] + 1, l_per_m[1], l_size[1]),
    ):
        lo, hi = math.floor(m_lo * scale + _EPS), math.ceil(m_hi * scale - _EPS)
        n = max(1, math.ceil((hi - lo) / tile))
        origin.append(_centred_origin(lo, hi, n * tile, size))
        shape.append(n)
    cols, rows = shape
    # Summed-area table: tissue pixels in any mask rectangle in O(1).
    sat = np.zeros((m_h + 1, m_w + 1), dtype=np.int64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    l_x0 = origin[0] + np.arange(cols, dtype=np.int64) * tile
    l_y0 = origin[1] + np.arange(rows, dtype=np.int64) * tile
    # Mask pixels the interior [l_x0, l_x0 + tile) overlaps (open on both sides: touching is not
    # overlapping, on the left as on the right).
    m_x0 = np.clip(np.floor(l_x0 / l_per_m[0] + _EPS).astype(np.int64), 0, m_w)
    m_x1 = np.clip(np.ceil((l_x0 + tile) / l_per_m[0] - _EPS).astype(np.int64), 0, m_w)
    m_y0 = np.clip(np.floor(l_y0 / l_per_m[1] + _EPS).astype(np.int64), 0, m_h)
    m_y1 = np.clip(np.ceil((l_y0 + tile) / l_per_m[1] - _EPS).astype(np.int64), 0, m_h)
    counts = (
        sat[m_y1[:, None], m_x1[None, :]]
        - sat[m_y0[:, None], m_x1[None, :]]
        - sat[m_y1[:, None], m_x0[None, :]]
        + sat[m_y0[:, None], m_x0[None, :]]
    )
    t_rows, t_cols = np.nonzero(counts > 0)
    t_rc = np.stack([t_rows, t_cols], axis=1).astype(np.int64).reshape(-1, 2)
    l_xy = np.stack([l_x0[t_cols], l_y0[t_rows]], axis=1).astype(np.int64).reshape(-1, 2)
    return TileGrid(tile, int(halo), l0_per_l, l_xy, t_rc, (rows, cols), (int(origin[0]), int(origin[1])))


def core_tile_side(
    m_bboxes: Sequence[tuple[int, int, int, int]],
    *,
    l_per_m: tuple[float, float],
    margin: int = 32,
    multiple: int = 8,
) -> int:
    """One tile side (analysis px) that holds every core's bounding box plus ``margin`` on each side.

    Args:
        m_bboxes: (x0, y0, x1, y1) of each core in mask pixels (x1, y1 exclusive).
        l_per_m: (x, y) analysis pixels per mask pixel.
        margin: Context around the box on every side, analysis pixels.
        multiple: The side is rounded up to a multiple of this (8: exact 90-degree equivariance).

    Returns:
        The side, a multiple of ``multiple``.
    """
    if not m_bboxes:
        raise ValueError("no cores: m_bboxes is empty")
    if margin < 0 or multiple < 1:
        raise ValueError(f"margin={margin} must be >= 0 and multiple={multiple} >= 1")
    extent = max(max((x1 - x0) * l_per_m[0], (y1 - y0) * l_per_m[1]) for x0, y0, x1, y1 in m_bboxes)
    side = math.ceil(extent - 1e-9) + 2 * margin
    return int(math.ceil(side / multiple) * multiple)


def core_grids(
    m_bboxes: Sequence[tuple[int, int, int, int]],
    *,
    l_per_m: tuple[float, float],
    side: int,
    l0_per_l: tuple[float, float] = (1.0, 1.0),
    l_size: tuple[float, float] | None = None,
) -> list[TileGrid]:
    """One single-tile grid per TMA core: a ``side`` square centred on the core's bounding box.

    The padding around a box is split evenly; where it is odd, the extra pixel goes on the side
    towards the image's centre (see the module docstring), so a rotated or mirrored slide's core
    tiles are the rotated or mirrored tiles.

    Args:
        m_bboxes: (x0, y0, x1, y1) of each core in mask pixels.
        l_per_m: (x, y) analysis pixels per mask pixel.
        side: Tile side in analysis pixels (see :func:`core_tile_side`); the halo is 0.
        l0_per_l: (x, y) level-0 pixels per analysis pixel.
        l_size: (width, height) of the slide in analysis pixels, whose centre breaks half-pixel
            ties; default: the centre of the box around all cores (as symmetric, but a core on the
            array's centre line with an odd padding is then rounded down).

    Returns:
        One :class:`TileGrid` per box (``grid_shape`` (1, 1), ``t_rc`` (0, 0)), in the boxes' order.
    """
    _check_tile(side, 0)
    side = int(side)
    if l_size is None and m_bboxes:
        # The mirror of the array's box about its own centre: ties break as for an image that size.
        lo_x, lo_y = (min(b[i] for b in m_bboxes) * l_per_m[i] for i in (0, 1))
        hi_x, hi_y = (max(b[i + 2] for b in m_bboxes) * l_per_m[i] for i in (0, 1))
        l_size = (lo_x + hi_x, lo_y + hi_y)
    grids = []
    for x0, y0, x1, y1 in m_bboxes:
        l_xy = np.array(
            [
                [
                    _centred_origin(x0 * l_per_m[0], x1 * l_per_m[0], side, l_size[0]),
                    _centred_origin(y0 * l_per_m[1], y1 * l_per_m[1], side, l_size[1]),
                ]
            ],
            np.int64,
        )
        grids.append(
            TileGrid(
                side,
                0,
                (float(l0_per_l[0]), float(l0_per_l[1])),
                l_xy,
                np.zeros((1, 2), np.int64),
                (1, 1),
                (int(l_xy[0, 0]), int(l_xy[0, 1])),
            )
        )
    return grids

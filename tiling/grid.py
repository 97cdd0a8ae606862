"""Tile grids at the analysis resolution: which tiles cover the tissue, and where to read them.

Coordinate planes (as in ``openslide/deepzoom.py``):

- ``l0_``: pixel (x, y) in the slide's level 0; x to the right, y down.
- ``l_``: pixel (x, y) at the *analysis resolution* (default 2.5 µm/px). One analysis pixel spans
  ``l0_per_l = (analysis mpp / slide mpp_x, analysis mpp / slide mpp_y)`` level-0 pixels, so
  ``l0_x = l_x * l0_per_l[0]``. A slide without a resolution is processed at native pixels:
  ``l0_per_l = (1, 1)`` and the analysis plane *is* level 0.
- ``t_``: (row, col) of a tile in the grid, row-major from the top-left.
- ``m_``: pixel (x, y) of the tissue mask (a thumbnail); one mask pixel spans ``l_per_m`` analysis
  pixels along (x, y).

A tile has an *interior* of ``tile x tile`` analysis pixels and a *halo* of ``halo`` pixels on every
side, giving the network its receptive field at the interior's border: the stored (and read) tile is
``side = tile + 2 * halo`` square. Grid tile ``(t_row, t_col)`` has its interior top-left at
``l_xy = (t_col * tile, t_row * tile)``; interiors tile the analysis plane without overlap and halos
overlap their neighbours (and may reach past the image, where the readers return white). A tile is
kept when its *interior* footprint overlaps at least one tissue-mask pixel.

Level-0 equivalents: the interior's top-left is at ``l_xy * l0_per_l`` (float); the read origin,
``l0_read_xy = round((l_xy - halo) * l0_per_l)``, is the integer level-0 pixel where the stored
tile's first pixel starts (so positions are exact to half a level-0 pixel).

TMA cores are stored whole: each core is one tile covering its bounding box plus ``margin`` on every
side, centred on the box, with ``halo = 0`` (the margin is the context). All cores of a slide share
one side, the largest core's, rounded up to a multiple of 8 so that the network's 90-degree
equivariance is exact (three stride-2 stages).

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
    """

    tile: int
    halo: int
    l0_per_l: tuple[float, float]
    l_xy: np.ndarray
    t_rc: np.ndarray
    grid_shape: tuple[int, int]

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

    Args:
        mask: (H, W) bool tissue mask (``m_`` plane), covering the whole slide.
        l_size: (width, height) of the slide in analysis pixels.
        l_per_m: (x, y) analysis pixels per mask pixel.
        tile: Interior side, analysis pixels.
        halo: Context on every side, analysis pixels.
        l0_per_l: (x, y) level-0 pixels per analysis pixel (recorded in the grid).

    Returns:
        A :class:`TileGrid`, tiles in row-major order; empty when the mask is.
    """
    _check_tile(tile, halo)
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask of shape {mask.shape} must be 2-D (H, W)")
    l_w, l_h = (max(1, math.ceil(v)) for v in l_size)
    rows, cols = math.ceil(l_h / tile), math.ceil(l_w / tile)
    m_h, m_w = mask.shape
    # Summed-area table: tissue pixels in any mask rectangle in O(1).
    sat = np.zeros((m_h + 1, m_w + 1), dtype=np.int64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    l_x0 = np.arange(cols, dtype=np.int64) * tile
    l_y0 = np.arange(rows, dtype=np.int64) * tile
    m_x0 = np.clip(np.floor(l_x0 / l_per_m[0]).astype(np.int64), 0, m_w)
    m_x1 = np.clip(np.ceil((l_x0 + tile) / l_per_m[0]).astype(np.int64), 0, m_w)
    m_y0 = np.clip(np.floor(l_y0 / l_per_m[1]).astype(np.int64), 0, m_h)
    m_y1 = np.clip(np.ceil((l_y0 + tile) / l_per_m[1]).astype(np.int64), 0, m_h)
    counts = (
        sat[m_y1[:, None], m_x1[None, :]]
        - sat[m_y0[:, None], m_x1[None, :]]
        - sat[m_y1[:, None], m_x0[None, :]]
        + sat[m_y0[:, None], m_x0[None, :]]
    )
    t_rows, t_cols = np.nonzero(counts > 0)
    t_rc = np.stack([t_rows, t_cols], axis=1).astype(np.int64).reshape(-1, 2)
    l_xy = np.stack([t_cols * tile, t_rows * tile], axis=1).astype(np.int64).reshape(-1, 2)
    return TileGrid(int(tile), int(halo), (float(l0_per_l[0]), float(l0_per_l[1])), l_xy, t_rc, (rows, cols))


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
) -> list[TileGrid]:
    """One single-tile grid per TMA core: a ``side`` square centred on the core's bounding box.

    Args:
        m_bboxes: (x0, y0, x1, y1) of each core in mask pixels.
        l_per_m: (x, y) analysis pixels per mask pixel.
        side: Tile side in analysis pixels (see :func:`core_tile_side`); the halo is 0.
        l0_per_l: (x, y) level-0 pixels per analysis pixel.

    Returns:
        One :class:`TileGrid` per box (``grid_shape`` (1, 1), ``t_rc`` (0, 0)), in the boxes' order.
    """
    _check_tile(side, 0)
    grids = []
    for x0, y0, x1, y1 in m_bboxes:
        l_cx = (x0 + x1) / 2 * l_per_m[0]
        l_cy = (y0 + y1) / 2 * l_per_m[1]
        l_xy = np.array([[math.floor(l_cx - side / 2 + 0.5), math.floor(l_cy - side / 2 + 0.5)]], np.int64)
        grids.append(
            TileGrid(
                int(side),
                0,
                (float(l0_per_l[0]), float(l0_per_l[1])),
                l_xy,
                np.zeros((1, 2), np.int64),
                (1, 1),
            )
        )
    return grids

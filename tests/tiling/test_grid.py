"""Tile grids: which tiles cover the tissue, level-0 equivalents, TMA core tiles (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from equislide.tiling import TileGrid, analysis_scale, core_grids, core_tile_side, tissue_grid


def test_analysis_scale() -> None:
    assert analysis_scale((0.25, 0.25), 2.5) == pytest.approx((10.0, 10.0))
    assert analysis_scale((0.499, 0.5), 2.5) == pytest.approx((2.5 / 0.499, 5.0))
    assert analysis_scale(None, 2.5) == (1.0, 1.0)
    with pytest.raises(ValueError, match="mpp=0"):
        analysis_scale((0.5, 0.5), 0)


def test_only_tiles_over_tissue_are_kept() -> None:
    # 1000 x 600 analysis px, mask at 10 analysis px per mask px (100 x 60 mask px).
    mask = np.zeros((60, 100), bool)
    mask[5, 5] = True  # analysis [50, 60) x [50, 60)
    mask[30, 80] = True  # analysis [800, 810) x [300, 310)
    # The tissue box [50, 810) x [50, 310) takes 3 x 2 tiles of 256, centred on it: the grid starts at
    # x = 430 - 384 = 46, y = 180 - 256 = -76 (it may start off the image).
    grid = tissue_grid(mask, l_size=(1000, 600), l_per_m=(10.0, 10.0), tile=256, halo=16, l0_per_l=(4.0, 4.0))
    assert grid.grid_shape == (2, 3) and grid.l_origin == (46, -76)
    assert grid.t_rc.tolist() == [[0, 0], [1, 2]]
    assert grid.l_xy.tolist() == [[46, -76], [558, 180]]
    assert grid.side == 288 and grid.n_tiles == 2
    assert grid.l0_xy.tolist() == [[184.0, -304.0], [2232.0, 720.0]]
    assert grid.l0_read_xy.tolist() == [[120, -368], [2168, 656]]  # halo included, level 0


def test_tissue_on_a_tile_border_counts_for_both_sides() -> None:
    # The box [0, 610) takes 3 tiles centred on it, from -79: interiors [-79, 177), [177, 433), [433, 689).
    # Mask px 17 spans analysis [170, 180): both tiles 0 and 1 overlap it (tile 1 has no other tissue).
    mask = np.zeros((10, 100), bool)
    mask[0, [0, 17, 60]] = True
    grid = tissue_grid(mask, l_size=(1000, 100), l_per_m=(10.0, 10.0), tile=256, halo=0)
    assert grid.l_origin == (-79, -123)
    assert grid.t_rc[:, 1].tolist() == [0, 1, 2]


def test_empty_mask_gives_no_tiles_and_full_mask_all() -> None:
    empty = tissue_grid(np.zeros((8, 8), bool), l_size=(100, 100), l_per_m=(12.5, 12.5), tile=32, halo=0)
    assert empty.n_tiles == 0 and empty.l_xy.shape == (0, 2)
    full = tissue_grid(np.ones((8, 8), bool), l_size=(100, 100), l_per_m=(12.5, 12.5), tile=32, halo=0)
    assert full.n_tiles == 16 and full.grid_shape == (4, 4)


def test_mask_finer_than_tiles_and_non_integer_scale() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((300, 200)) > 0.995
    l_per_m = (0.7, 0.7)
    grid = tissue_grid(mask, l_size=(140, 210), l_per_m=l_per_m, tile=64, halo=8)
    # Brute force: a tile is kept iff a tissue pixel's footprint overlaps its interior.
    ys, xs = np.nonzero(mask)
    expected = set()
    for row in range(grid.grid_shape[0]):
        for col in range(grid.grid_shape[1]):
            x0, y0 = grid.l_origin[0] + col * 64, grid.l_origin[1] + row * 64
            hit = ((xs + 1) * l_per_m[0] > x0) & (xs * l_per_m[0] < x0 + 64)
            hit &= ((ys + 1) * l_per_m[1] > y0) & (ys * l_per_m[1] < y0 + 64)
            if hit.any():
                expected.add((row, col))
    assert {tuple(rc) for rc in grid.t_rc.tolist()} == expected


def test_bad_tile_and_halo() -> None:
    with pytest.raises(ValueError, match="tile=4"):
        tissue_grid(np.ones((2, 2), bool), l_size=(10, 10), l_per_m=(5.0, 5.0), tile=4)
    with pytest.raises(ValueError, match="halo=-1"):
        tissue_grid(np.ones((2, 2), bool), l_size=(10, 10), l_per_m=(5.0, 5.0), tile=8, halo=-1)


def test_core_tiles_share_one_side_divisible_by_8_and_hold_the_core() -> None:
    boxes = [(10, 10, 60, 58), (100, 12, 149, 70), (10, 100, 55, 141)]  # mask px
    l_per_m = (2.0, 2.0)
    side = core_tile_side(boxes, l_per_m=l_per_m, margin=16)
    assert side % 8 == 0
    assert side >= 116 + 32  # largest extent 58 mask px = 116 analysis px, plus the margins
    grids = core_grids(boxes, l_per_m=l_per_m, side=side, l0_per_l=(5.0, 5.0))
    for (x0, y0, x1, y1), grid in zip(boxes, grids, strict=True):
        assert isinstance(grid, TileGrid)
        assert grid.n_tiles == 1 and grid.halo == 0 and grid.side == side and grid.grid_shape == (1, 1)
        l_x, l_y = grid.l_xy[0]
        assert l_x + 16 <= x0 * 2 and (x1 * 2) + 16 <= l_x + side
        assert l_y + 16 <= y0 * 2 and (y1 * 2) + 16 <= l_y + side
        assert grid.l0_read_xy[0].tolist() == [l_x * 5, l_y * 5]
    with pytest.raises(ValueError, match="no cores"):
        core_tile_side([], l_per_m=l_per_m)

"""Block reads (Slide.read_tiles_mpp, read_tile_batches) give the per-tile read_region_mpp pixels exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from equislide.tiling import open_slide, plan_samples, read_tile_batches


def _write_pyramid(
    path: Path, width: int, height: int, tile: int, *, levels: int = 3, mpp: float = 0.25
) -> Path:
    """A pyramidal JPEG TIFF (levels halved by PIL's reduce) with fine detail, so that a read one
    sub-pixel off gives other pixels."""
    rng = np.random.default_rng(width + height + tile)
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    level = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)).copy()
    level[::7] //= 2
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            tw.write(
                level,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 85},
                resolution=(px_per_cm / 2**k, px_per_cm / 2**k),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                metadata=None,
            )
            level = np.asarray(Image.fromarray(level).reduce(2))
    return path


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pyramids")
    return {
        # Sizes divisible by 4: OpenSlide's downsamples are exactly 2 and 4, so blocks apply.
        "exact": _write_pyramid(root / "exact.tiff", 2048, 1536, 256),
        # Odd sizes: downsamples 1.9989..., 3.995...: every tile is read alone above level 0.
        "odd": _write_pyramid(root / "odd.tiff", 2047, 1533, 512),
    }


def _positions(dims: tuple[int, int], step: int, origin: tuple[int, int]) -> np.ndarray:
    xs, ys = np.arange(origin[0], dims[0], step), np.arange(origin[1], dims[1], step)
    return np.array([(x, y) for y in ys for x in xs], np.int64)


def _per_tile(slide, l0: np.ndarray, side: int, mpp: float | None) -> np.ndarray:
    return np.stack([slide.read_region_mpp((int(x), int(y)), (side, side), mpp) for x, y in l0])


def _count_reads(slide) -> list[tuple[int, int]]:
    """Record the size of every level read the slide makes (the real reads still happen)."""
    sizes: list[tuple[int, int]] = []
    read = slide._read_image

    def counted(l0_xy, level, size):
        sizes.append(size)
        return read(l0_xy, level, size)

    slide._read_image = counted
    return sizes


# (mpp, side, step, origin): whole and odd level factors, tiles straddling the 256 / 512 px JPEG
# tiles, reads past the right and bottom edges and before the top-left one.
CASES = [
    (1.0, 100, 93, (-37, -53)),  # level 2 (ds 4), resampled 1:1 -> direct read
    (0.5, 128, 117, (3, 5)),  # level 1 (ds 2), direct, odd residues
    (0.7, 100, 91, (-3, -5)),  # level 1, bilinear-box resize of 1.4 px per px
    (1.3, 64, 61, (-101, -77)),  # level 2, factor 1.3
    (0.25, 300, 301, (-150, -150)),  # level 0, direct
    (0.33, 96, 90, (0, 0)),  # level 0, factor 1.32
]


@pytest.mark.parametrize("name", ["exact", "odd"])
@pytest.mark.parametrize(("mpp", "side", "step", "origin"), CASES)
def test_blocks_equal_per_tile_reads(pyramids, name, mpp, side, step, origin) -> None:
    with open_slide(pyramids[name]) as slide:
        l0 = _positions(slide.dimensions, step, origin)
        expected = _per_tile(slide, l0, side, mpp)
        sizes = _count_reads(slide)
        got = slide.read_tiles_mpp(l0, (side, side), mpp)
        assert got.shape == expected.shape and got.dtype == np.uint8
        assert np.array_equal(got, expected)
        level = slide.best_level_for_downsample(mpp / slide.mpp[0])
        if name == "exact" or level == 0:
            # Blocks were read: fewer, larger reads than tiles.
            assert len(sizes) < len(l0) / 2
        else:
            assert len(sizes) == len(l0)


def test_block_cap_and_per_tile_switch(pyramids) -> None:
    with open_slide(pyramids["exact"]) as slide:
        l0 = _positions(slide.dimensions, 117, (0, 0))
        expected = _per_tile(slide, l0, 128, 0.5)
        sizes = _count_reads(slide)
        capped = slide.read_tiles_mpp(l0, (128, 128), 0.5, max_block_bytes=4 * 128 * 128 * 3)
        assert np.array_equal(capped, expected)
        assert max(w * h for w, h in sizes) * 4 <= 4 * 128 * 128 * 3
        sizes.clear()
        alone = slide.read_tiles_mpp(l0, (128, 128), 0.5, max_block_bytes=None)
        assert np.array_equal(alone, expected) and len(sizes) == len(l0)


def test_native_pixels_blocks(shared_data: Path) -> None:
    with open_slide(shared_data / "slides/TCGA-CR-7395-01A-01-TS1.svs") as slide:
        l0 = _positions(slide.dimensions, 250, (-20, -20))
        assert np.array_equal(slide.read_tiles_mpp(l0, (256, 256), None), _per_tile(slide, l0, 256, None))


@pytest.mark.parametrize(
    ("name", "input_mpp", "mpp"),
    [
        ("CMU-1-Small-Region.svs", None, 2.5),  # one level: blocks at level 0, 5.01 px per px
        ("CMU-1-Small-Region.svs", None, 1.1),
        ("CMU-1-Small-Region.pyramid3.tiff", None, 2.5),  # level 2 of ds 4.002: per tile
        ("TCGA-CR-7395-01A-01-TS1.svs", 0.5, 1.7),  # JPEG 2000 tiles, level 1 of ds 2.0005
        ("TCGA-CR-7395.pyramid4.tiff", 0.5, 2.5),
    ],
)
def test_real_slides_tile_batches_equal_per_tile(shared_data: Path, name, input_mpp, mpp) -> None:
    path = shared_data / "slides" / name
    layout = plan_samples(
        path, sample_id="s", params={}, mpp=mpp, tile=96, halo=8, input_mpp=input_mpp, tma="no"
    )
    sample = layout.todo[0]
    grid = sample.grid
    assert grid.n_tiles >= 20
    with open_slide(path, input_mpp=input_mpp) as slide:
        expected = _per_tile(slide, grid.l0_read_xy, grid.side, sample.analysis_mpp)
        batches = list(read_tile_batches(slide, sample, 32))
        n = grid.n_tiles
        parts = list(read_tile_batches(slide, sample, 16, start=8, stop=n - 3))
    assert [s for s, _ in batches] == list(range(0, grid.n_tiles, 32))
    assert np.array_equal(np.concatenate([b for _, b in batches]), expected)
    assert [s for s, _ in parts] == list(range(8, n - 3, 16))
    assert np.array_equal(np.concatenate([b for _, b in parts]), expected[8 : n - 3])

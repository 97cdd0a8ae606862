"""Laying out a slide's samples: :func:`plan_samples` (mask, dearray, grids) and :func:`read_tile_batches`.

:func:`plan_samples` opens one input file, masks the tissue on a thumbnail, dearrays it when it is a
tissue microarray and lays each sample's tile grid at the analysis resolution (see :mod:`.grid` for
the planes and the tile / halo conventions). :func:`read_tile_batches` reads a planned sample's tiles
with :meth:`~equislide.tiling.Slide.read_region_mpp`, a batch at a time. Nothing here writes: the tile
stage (:mod:`equislide.stages.tile`) decides what is finished and stores the tiles.

Samples: a whole slide is one sample (ID: the file stem made safe) with many tiles; a TMA slide
gives one sample per core (``<slide>/<core name>``, e.g. ``tma01/B3``), each stored whole as a
single tile.

Memory stays bounded whatever the slide size: the thumbnail is read in strips, and tiles are read
a row of one batch at a time, in blocks of at most ``MAX_BLOCK_BYTES`` (64 MB), or one at a time
where no block applies (a 576 px tile at 2.5 µm/px from a 0.25 µm/px level 0 reads a 5760 px square, ~130 MB
as RGBA, when the slide has no pyramid level in between).

Slides without a usable resolution (rules: :mod:`equislide.tiling._mpp`) and no ``input_mpp`` are
refused (:class:`~equislide.tiling.NoUsableMppError`) unless ``native_pixels=True``: then they are
processed at native level-0 pixels, with a warning in the plan and ``native_pixels: true`` in the
sample metadata (the cohort K-means leaves such samples out of its fit); never silently taken as
some mpp. A slide planned to more than ``max_tiles`` tiles is refused before any tile is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._base import MAX_BLOCK_BYTES
from ._errors import NoTissueError, NoUsableMppError, SlideTooLargeError, UnsupportedImageError
from .grid import TileGrid, analysis_scale, core_grids, core_tile_side, tissue_grid
from .slide import open_slide
from .tissue import tissue_mask
from .tma import find_cores, is_tma

__all__ = [
    "MAX_TILES",
    "MIN_SIDE",
    "NO_MPP_WARNING",
    "THUMBNAIL_MAX",
    "SamplePlan",
    "SlideLayout",
    "plan_samples",
    "read_tile_batches",
]

#: Longest side of the thumbnail the tissue mask and the TMA cores are computed on.
THUMBNAIL_MAX = 1024
#: Images smaller than this (analysis pixels, either side) are refused: nothing to segment.
MIN_SIDE = 16
#: A slide planned to more tiles than this is refused (a 100 x 50 mm scan at 0.5 µm/px and 512 px
#: tiles is ~77k tiles; a wrong mpp makes millions).
MAX_TILES = 100_000

TmaMode = Literal["auto", "yes", "no"]

NO_MPP_WARNING = (
    "no usable resolution: processed at native level-0 pixels as asked (--native-pixels); the "
    "analysis mpp was not applied, and a cohort K-means fit leaves it out unless --fit-native"
)


@dataclass(frozen=True)
class SamplePlan:
    """One sample of an input, laid out and ready to be read and stored (picklable: a worker can take it).

    Attributes:
        path: The input file.
        sample_id: ``slide`` or ``slide/core``.
        input_sha256: SHA-256 of the input file.
        params: :func:`tiling_params` of the run (keys the finished store).
        input_mpp: µm per level-0 pixel filling in missing metadata (None: the file's own).
        analysis_mpp: The resolution tiles are read at (None: native level-0 pixels).
        grid: The sample's tiles.
        mask: The thumbnail tissue mask under the sample.
        mask_l_origin: Analysis-pixel position of the mask's origin.
        mask_downsample: Analysis pixels per mask pixel.
        attrs: Metadata stored with the sample.
        warnings: One-line warnings of the input.
        force_mpp: µm per level-0 pixel replacing the metadata (None: not forced).
    """

    path: str
    sample_id: str
    input_sha256: str
    params: dict[str, Any]
    input_mpp: float | None
    analysis_mpp: float | None
    grid: TileGrid
    mask: np.ndarray
    mask_l_origin: tuple[float, float]
    mask_downsample: float
    attrs: dict[str, Any]
    warnings: tuple[str, ...] = ()
    force_mpp: float | None = None


@dataclass
class SlideLayout:
    """What tiling one input takes: :func:`plan_samples`' result.

    Attributes:
        path: The input file.
        input_sha256: Its SHA-256.
        sample_ids: Every sample of the input, in order ((row, col) for TMA cores).
        todo: Samples still to write.
        done: IDs of samples the caller's ``is_done`` said are finished.
        warnings: One-line warnings of the input.
    """

    path: str
    input_sha256: str
    sample_ids: list[str]
    todo: list[SamplePlan]
    done: list[str]
    warnings: list[str] = field(default_factory=list)


def plan_samples(
    path: str | os.PathLike[str],
    *,
    sample_id: str,
    params: Mapping[str, Any],
    mpp: float = 2.5,
    tile: int = 512,
    halo: int = 32,
    input_mpp: float | None = None,
    force_mpp: float | None = None,
    native_pixels: bool = False,
    max_tiles: int = MAX_TILES,
    tma: TmaMode = "auto",
    input_sha256: str | None = None,
    is_done: Callable[[str, str], bool] | None = None,
) -> SlideLayout:
    """Open and mask one input, dearray it when it is a TMA, and lay out each sample's tiles.

    Reads only the thumbnail. ``is_done(sample_id, input_sha256)`` tells which samples are already
    finished (the caller knows where results live); a whole slide (``tma="no"``) that is finished is
    returned before its thumbnail is read.

    Args:
        path: The slide or image file.
        sample_id: The slide's ID (a TMA core adds ``/<core name>``).
        params: The tiling parameters, stamped on every :class:`SamplePlan` (they key its store).
        mpp: Analysis resolution, µm per pixel.
        tile: Interior side of a whole-slide tile, analysis pixels.
        halo: Context on every side of a whole-slide tile, and the margin around a TMA core, px.
        input_mpp: µm per level-0 pixel filling in where the file has no usable resolution.
        force_mpp: µm per level-0 pixel replacing the file's metadata.
        native_pixels: Process a slide without a usable resolution at native level-0 pixels
            instead of refusing it.
        max_tiles: Refuse a slide planned to more tiles than this.
        tma: ``"auto"`` (dearray when :func:`~equislide.tiling.is_tma` says so), ``"yes"`` or ``"no"``.
        input_sha256: The file's SHA-256 when the caller has it (else computed once the file opened).
        is_done: Predicate of finished samples; None = nothing is finished.

    Raises:
        SlideError: The file cannot be opened or read (a subclass names why).
        NoUsableMppError: No usable resolution, no ``input_mpp`` and not ``native_pixels``.
        SlideTooLargeError: More than ``max_tiles`` tiles, or no pyramid level small enough for
            the thumbnail.
        NoTissueError: The tissue mask is empty (or ``tma="yes"`` finds no core).
        UnsupportedImageError: The image is under 16 analysis pixels on a side.
        ValueError: A bad parameter (the message names it).
    """
    from equislide.files import sha256_file

    if tma not in ("auto", "yes", "no"):
        raise ValueError(f"tma={tma!r}; use 'auto', 'yes' or 'no'")
    analysis_scale(None, mpp)  # validates mpp
    path = Path(path)
    params = dict(params)
    slide_id = sample_id
    done = is_done or (lambda _sid, _sha: False)

    with open_slide(path, input_mpp=input_mpp, force_mpp=force_mpp) as slide:
        warnings: list[str] = list(slide.mpp_warnings)
        if slide.mpp is None:
            if not native_pixels:
                raise NoUsableMppError(
                    path,
                    f"no usable resolution: {slide.mpp_problem}",
                    detail="give --input-mpp X in µm per level-0 pixel, or --native-pixels to process it "
                    "at native pixels",
                )
            warnings.append(f"{NO_MPP_WARNING} ({slide.mpp_problem})")
            analysis_mpp: float | None = None
        else:
            analysis_mpp = float(mpp)
        sha = input_sha256 or sha256_file(path)
        l0_per_l = analysis_scale(slide.mpp, mpp)
        l0_w, l0_h = slide.dimensions
        l_size = (math.ceil(l0_w / l0_per_l[0]), math.ceil(l0_h / l0_per_l[1]))
        if min(l_size) < MIN_SIDE:
            raise UnsupportedImageError(
                path,
                f"image too small: {l0_w}x{l0_h} px is {l_size[0]}x{l_size[1]} px at the analysis "
                f"resolution, under {MIN_SIDE} px",
            )
        # A whole slide that is not a TMA is one sample: skip it before any pixel is read.
        if tma == "no" and done(slide_id, sha):
            return SlideLayout(str(path), sha, [slide_id], [], [slide_id], warnings)

        rgb, m_ds_x = slide.thumbnail(max_size=THUMBNAIL_MAX)
        m_ds = (m_ds_x, l0_h / rgb.shape[0])  # level-0 px per mask px along (x, y)
        m_mpp = None if slide.mpp is None else slide.mpp[0] * m_ds[0]
        mask = tissue_mask(rgb, mpp=m_mpp)
        del rgb
        if not mask.any():
            raise NoTissueError(path, "no tissue found", detail="the tissue mask of the thumbnail is empty")
        l_per_m = (m_ds[0] / l0_per_l[0], m_ds[1] / l0_per_l[1])
        dearray = tma == "yes" or (tma == "auto" and is_tma(mask, m_mpp))

        common = {
            "source_path": str(path.resolve()),
            "mpp": analysis_mpp,
            "source_mpp": None if slide.mpp is None else float(slide.mpp[0]),
            "source_mpp_xy": None if slide.mpp is None else [float(v) for v in slide.mpp],
            "mpp_source": slide.mpp_source,
            "native_pixels": slide.mpp is None,
            "source_dimensions": [int(l0_w), int(l0_h)],
            "l0_per_l": [float(v) for v in l0_per_l],
            "warnings": list(warnings),
        }
        # (sample_id, grid, mask crop, its origin, extra attributes)
        layout: list[tuple[str, TileGrid, np.ndarray, tuple[float, float], dict[str, Any]]] = []
        if dearray:
            cores = find_cores(mask, mpp=m_mpp)
            if not cores:
                raise NoTissueError(path, "no TMA cores found", detail=f"tma={tma!r}; try tma='no'")
            side = core_tile_side([c.bbox for c in cores], l_per_m=l_per_m, margin=int(halo))
            grids = core_grids(
                [c.bbox for c in cores], l_per_m=l_per_m, side=side, l0_per_l=l0_per_l, l_size=l_size
            )
            for core, grid in zip(cores, grids, strict=True):
                crop, origin = _mask_crop(mask, grid, l_per_m)
                extra = {
                    "kind": "tma_core",
                    "core": {"name": core.name, "row": core.row, "col": core.col},
                    "slide_sample_id": slide_id,
                }
                # Core names are a row letter and a column number: already safe in a sample ID.
                layout.append((f"{slide_id}/{core.name}", grid, crop, origin, extra))
        else:
            grid = tissue_grid(mask, l_size=l_size, l_per_m=l_per_m, tile=tile, halo=halo, l0_per_l=l0_per_l)
            layout.append((slide_id, grid, mask, (0.0, 0.0), {"kind": "slide"}))
        n_tiles = sum(grid.n_tiles for _, grid, *_ in layout)
        if n_tiles > max_tiles:
            scale = "native pixels" if analysis_mpp is None else f"{analysis_mpp:g} µm/px"
            raise SlideTooLargeError(
                path,
                f"planned {n_tiles} tiles at {scale}, above the limit of {max_tiles} per slide",
                detail=f"slide mpp {slide.mpp[0]:.4g} from {slide.mpp_source}" if slide.mpp else None,
            )

    plan = SlideLayout(str(path), sha, [sid for sid, *_ in layout], [], [], warnings)
    for sid, grid, crop, origin, extra in layout:
        if done(sid, sha):
            plan.done.append(sid)
            continue
        attrs = {
            **common,
            **extra,
            "grid_shape": list(grid.grid_shape),
            "tissue_mask_l_origin": [float(v) for v in origin],
        }
        plan.todo.append(
            SamplePlan(
                str(path),
                sid,
                sha,
                params,
                input_mpp,
                analysis_mpp,
                grid,
                crop,
                origin,
                float(l_per_m[0]),
                attrs,
                tuple(warnings),
                force_mpp,
            )
        )
    return plan


def read_tile_batches(
    slide,
    sample: SamplePlan,
    batch_tiles: int,
    *,
    start: int = 0,
    stop: int | None = None,
    max_block_bytes: int | None = MAX_BLOCK_BYTES,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, tiles)`` for a planned sample, ``batch_tiles`` tiles at a time, in grid order.

    Each batch is read with :meth:`~equislide.tiling.Slide.read_tiles_mpp`: the tiles of a row are
    cut from blocks of the pyramid level where the reader allows it, bit-identical to reading each
    tile with :meth:`~equislide.tiling.Slide.read_region_mpp`.

    Args:
        slide: The sample's input, open (:func:`~equislide.tiling.open_slide` with its ``input_mpp``
            and ``force_mpp``).
        sample: A plan of :func:`plan_samples`.
        batch_tiles: Tiles per batch (the tile store's shard).
        start: First tile to read (batches start here, then every ``batch_tiles``).
        stop: One past the last tile to read (default: all).
        max_block_bytes: Largest block read at once; ``None`` reads tile by tile.

    Returns:
        An iterator of ``(index of the first tile, (n, side, side, 3) uint8 RGB)``.
    """
    grid = sample.grid
    stop = grid.n_tiles if stop is None else min(stop, grid.n_tiles)
    l0_read = grid.l0_read_xy
    for first in range(start, stop, batch_tiles):
        last = min(stop, first + batch_tiles)
        batch = slide.read_tiles_mpp(
            l0_read[first:last], (grid.side, grid.side), sample.analysis_mpp, max_block_bytes=max_block_bytes
        )
        yield first, batch


def _mask_crop(
    mask: np.ndarray, grid: TileGrid, l_per_m: tuple[float, float]
) -> tuple[np.ndarray, tuple[float, float]]:
    """The mask pixels under a single-tile grid's footprint and the ``l_`` position of their origin."""
    (l_x, l_y), side = grid.l_xy[0] - grid.halo, grid.side
    m_h, m_w = mask.shape
    m_x0 = int(np.clip(math.floor(l_x / l_per_m[0]), 0, m_w - 1))
    m_y0 = int(np.clip(math.floor(l_y / l_per_m[1]), 0, m_h - 1))
    m_x1 = int(np.clip(math.ceil((l_x + side) / l_per_m[0]), m_x0 + 1, m_w))
    m_y1 = int(np.clip(math.ceil((l_y + side) / l_per_m[1]), m_y0 + 1, m_h))
    return mask[m_y0:m_y1, m_x0:m_x1], (m_x0 * l_per_m[0], m_y0 * l_per_m[1])

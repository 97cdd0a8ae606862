"""From a slide file to per-sample tile stores: :func:`tile_slide`.

One call handles one input file: open it, hash it, mask the tissue on a thumbnail, dearray it when
it is a tissue microarray, lay the tile grid at the analysis resolution (see :mod:`.grid` for the
planes and the tile / halo conventions), read the tiles with
:meth:`~equislide.tiling.Slide.read_region_mpp` in batches of 32 (one zarr shard) and write each
sample atomically with :func:`equislide.storage.open_sample_for_write`.

Samples: a whole slide is one sample (ID: the file stem made safe) with many tiles; a TMA slide
gives one sample per core (``<slide>/<core name>``, e.g. ``tma01/B3``), each stored whole as a
single tile. A finished sample made from the same input bytes and parameters is skipped, so a rerun
over the same output folder only does what is missing and the stores are byte-identical to an
uninterrupted run.

Memory stays bounded whatever the slide size: the thumbnail is read in strips, and tiles are read
one at a time and written 32 at a time (a 576 px tile at 2.5 µm/px from a 0.25 µm/px level 0 reads
a 5760 px square, ~130 MB as RGBA, when the slide has no pyramid level in between).

Slides without a resolution (and no ``input_mpp``) are processed at native level-0 pixels, with a
warning in the result and in the sample metadata; they are never silently taken as some mpp.

This module imports :mod:`equislide.storage` (the data flows from tiling into storage, never back);
it has no Dask or Prefect: the CLI (and the flows) distribute calls of :func:`tile_slide` across
workers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._errors import NoTissueError, UnsupportedImageError
from .grid import TileGrid, analysis_scale, core_grids, core_tile_side, tissue_grid
from .slide import open_slide
from .tissue import tissue_mask
from .tma import find_cores, is_tma

__all__ = ["PIPELINE_FORMAT", "SampleResult", "tile_slide", "tiling_params"]

#: Version tag of the tiling parameters; part of every sample's parameter hash.
PIPELINE_FORMAT = "equislide-tiling/1"
#: Longest side of the thumbnail the tissue mask and the TMA cores are computed on.
THUMBNAIL_MAX = 1024
#: Images smaller than this (analysis pixels, either side) are refused: nothing to segment.
MIN_SIDE = 16
#: Tiles read and written per batch (one shard of the tile store).
BATCH_TILES = 32

TmaMode = Literal["auto", "yes", "no"]
#: ``progress(sample_id, tiles_done, tiles_total)``, called after each batch written.
ProgressCallback = Callable[[str, int, int], None]

NO_MPP_WARNING = (
    "no resolution in the metadata and no input_mpp: processed at native level-0 pixels "
    "(the analysis mpp was not applied; pass --input-mpp to fix the scale)"
)


@dataclass
class SampleResult:
    """What happened to one sample.

    Attributes:
        sample_id: ``slide`` or ``slide/core``.
        store: The finished store, ``<out_root>/<sample_id>.zarr``.
        status: ``"written"`` or ``"skipped"`` (already finished for this input and parameters).
        n_tiles: Tiles in the store.
        side: Stored tile side, halo included (analysis pixels).
        input_sha256: SHA-256 of the input file.
        warnings: One-line warnings (e.g. no resolution: native pixels).
        seconds: Wall time spent on this sample (0 for a skipped one).
    """

    sample_id: str
    store: Path
    status: str
    n_tiles: int
    side: int
    input_sha256: str
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Sample:
    sample_id: str
    grid: TileGrid
    mask: np.ndarray
    mask_l_origin: tuple[float, float]
    extra: dict[str, Any]


def tiling_params(*, mpp: float, tile: int, halo: int, input_mpp: float | None, tma: str) -> dict[str, Any]:
    """The parameter dict whose hash decides whether a finished sample can be reused."""
    return {
        "format": PIPELINE_FORMAT,
        "mpp": float(mpp),
        "tile": int(tile),
        "halo": int(halo),
        "input_mpp": None if input_mpp is None else float(input_mpp),
        "tma": tma,
        "thumbnail_max": THUMBNAIL_MAX,
        "batch_tiles": BATCH_TILES,
    }


def tile_slide(
    path: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    *,
    sample_id: str | None = None,
    mpp: float = 2.5,
    tile: int = 512,
    halo: int = 32,
    input_mpp: float | None = None,
    tma: TmaMode = "auto",
    input_sha256: str | None = None,
    progress: ProgressCallback | None = None,
) -> list[SampleResult]:
    """Tile one slide (or plain image) into per-sample zarr stores under ``out_root``.

    Args:
        path: The slide or image file.
        out_root: Folder of the run's stores; ``<out_root>/<sample_id>.zarr`` per sample.
        sample_id: The slide's ID (default: the file stem made safe with ``safe_sample_id``);
            pass :func:`~equislide.storage.unique_sample_ids`' value when tiling many files.
        mpp: Analysis resolution, µm per pixel.
        tile: Interior side of a whole-slide tile, analysis pixels.
        halo: Context on every side of a whole-slide tile, and the margin around a TMA core,
            analysis pixels.
        input_mpp: µm per level-0 pixel overriding (or filling in) the file's metadata.
        tma: ``"auto"`` (dearray when :func:`~equislide.tiling.is_tma` says so), ``"yes"`` or ``"no"``.
        input_sha256: The file's SHA-256 when the caller already has it (else it is computed).
        progress: Called as ``progress(sample_id, tiles_done, tiles_total)`` after each batch.

    Returns:
        One :class:`SampleResult` per sample, in (row, col) order for TMA cores.

    Raises:
        SlideError: The file cannot be opened or read (a subclass names why).
        NoTissueError: The tissue mask is empty (or ``tma="yes"`` finds no core).
        UnsupportedImageError: The image is under 16 analysis pixels on a side.
        ValueError: A bad parameter (the message names it).
    """
    from equislide.storage import (
        is_sample_done,
        open_sample_for_write,
        safe_sample_id,
        sample_store_path,
        sha256_file,
    )

    if tma not in ("auto", "yes", "no"):
        raise ValueError(f"tma={tma!r}; use 'auto', 'yes' or 'no'")
    if int(tile) != tile or tile < 8:
        raise ValueError(f"tile={tile!r} must be an integer >= 8 (analysis pixels)")
    if int(halo) != halo or halo < 0:
        raise ValueError(f"halo={halo!r} must be an integer >= 0 (analysis pixels)")
    analysis_scale(None, mpp)  # validates mpp
    path = Path(path)
    params = tiling_params(mpp=mpp, tile=tile, halo=halo, input_mpp=input_mpp, tma=tma)

    with open_slide(path, input_mpp=input_mpp) as slide:
        sha = input_sha256 or sha256_file(path)
        slide_id = sample_id or safe_sample_id(path.stem if path.suffix else path.name)
        warnings: list[str] = []
        if slide.mpp is None:
            warnings.append(NO_MPP_WARNING)
            analysis_mpp: float | None = None
        else:
            analysis_mpp = float(mpp)
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
        if tma == "no" and is_sample_done(out_root, slide_id, input_sha256=sha, params=params):
            return [_skipped(out_root, slide_id, sha, sample_store_path)]

        rgb, m_ds_x = slide.thumbnail(max_size=THUMBNAIL_MAX)
        m_ds = (m_ds_x, l0_h / rgb.shape[0])  # level-0 px per mask px along (x, y)
        m_mpp = None if slide.mpp is None else slide.mpp[0] * m_ds[0]
        mask = tissue_mask(rgb, mpp=m_mpp)
        del rgb
        if not mask.any():
            raise NoTissueError(path, "no tissue found", detail="the tissue mask of the thumbnail is empty")
        l_per_m = (m_ds[0] / l0_per_l[0], m_ds[1] / l0_per_l[1])
        dearray = tma == "yes" or (tma == "auto" and is_tma(mask, m_mpp))

        samples: list[_Sample] = []
        common = {
            "source_path": str(path.resolve()),
            "mpp": analysis_mpp,
            "source_mpp": None if slide.mpp is None else float(slide.mpp[0]),
            "source_mpp_xy": None if slide.mpp is None else [float(v) for v in slide.mpp],
            "mpp_source": slide.mpp_source,
            "source_dimensions": [int(l0_w), int(l0_h)],
            "l0_per_l": [float(v) for v in l0_per_l],
            "warnings": list(warnings),
        }
        if dearray:
            cores = find_cores(mask, mpp=m_mpp)
            if not cores:
                raise NoTissueError(path, "no TMA cores found", detail=f"tma={tma!r}; try tma='no'")
            side = core_tile_side([c.bbox for c in cores], l_per_m=l_per_m, margin=int(halo))
            grids = core_grids([c.bbox for c in cores], l_per_m=l_per_m, side=side, l0_per_l=l0_per_l)
            for core, grid in zip(cores, grids, strict=True):
                crop, origin = _mask_crop(mask, grid, l_per_m)
                extra = {
                    "kind": "tma_core",
                    "core": {"name": core.name, "row": core.row, "col": core.col},
                    "slide_sample_id": slide_id,
                }
                samples.append(_Sample(f"{slide_id}/{safe_sample_id(core.name)}", grid, crop, origin, extra))
        else:
            grid = tissue_grid(mask, l_size=l_size, l_per_m=l_per_m, tile=tile, halo=halo, l0_per_l=l0_per_l)
            samples.append(_Sample(slide_id, grid, mask, (0.0, 0.0), {"kind": "slide"}))

        results = []
        for sample in samples:
            if is_sample_done(out_root, sample.sample_id, input_sha256=sha, params=params):
                results.append(_skipped(out_root, sample.sample_id, sha, sample_store_path, warnings))
                continue
            t0 = time.perf_counter()
            grid = sample.grid
            attrs = {
                **common,
                **sample.extra,
                "grid_shape": list(grid.grid_shape),
                "tissue_mask_l_origin": [float(v) for v in sample.mask_l_origin],
            }
            with open_sample_for_write(
                out_root,
                sample.sample_id,
                n_tiles=grid.n_tiles,
                tile=grid.tile,
                halo=grid.halo,
                attrs=attrs,
                params=params,
                input_sha256=sha,
                shard_tiles=BATCH_TILES,
            ) as writer:
                l0_read = grid.l0_read_xy
                for start in range(0, grid.n_tiles, BATCH_TILES):
                    stop = min(grid.n_tiles, start + BATCH_TILES)
                    batch = np.empty((stop - start, grid.side, grid.side, 3), np.uint8)
                    for i in range(start, stop):
                        l0_xy = (int(l0_read[i, 0]), int(l0_read[i, 1]))
                        batch[i - start] = slide.read_region_mpp(l0_xy, (grid.side, grid.side), analysis_mpp)
                    writer.write_tiles(start, batch, grid.l_xy[start:stop])
                    if progress is not None:
                        progress(sample.sample_id, stop, grid.n_tiles)
                writer.write_tissue_mask(sample.mask, downsample=float(l_per_m[0]))
            results.append(
                SampleResult(
                    sample.sample_id,
                    writer.path,
                    "written",
                    grid.n_tiles,
                    grid.side,
                    sha,
                    list(warnings),
                    time.perf_counter() - t0,
                )
            )
        return results


def _skipped(
    out_root, sample_id: str, sha: str, store_path, warnings: list[str] | None = None
) -> SampleResult:
    from equislide.storage import read_sample_meta

    store = store_path(out_root, sample_id)
    meta = read_sample_meta(store)
    return SampleResult(
        sample_id,
        store,
        "skipped",
        int(meta["n_tiles"]),
        int(meta["tile_with_halo"]),
        sha,
        list(meta.get("warnings") or warnings or []),
    )


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

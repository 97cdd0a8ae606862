"""From a slide file to per-sample tile stores: :func:`tile_slide`, or its two halves apart.

:func:`plan_slide` opens one input file, hashes it, masks the tissue on a thumbnail, dearrays it when
it is a tissue microarray and lays each sample's tile grid at the analysis resolution (see :mod:`.grid`
for the planes and the tile / halo conventions). :func:`write_samples` reads the tiles of some of those
samples with :meth:`~equislide.tiling.Slide.read_region_mpp` in batches of 32 (one zarr shard) and
writes each sample atomically with :func:`equislide.storage.open_sample_for_write`. The split lets a
cluster write the cores of one TMA slide on several workers at once.

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
it has no Dask or Prefect: the CLI distributes calls of :func:`tile_slide` across workers, the
cohort flow calls of :func:`plan_slide` and :func:`write_samples`.
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

__all__ = [
    "PIPELINE_FORMAT",
    "SamplePlan",
    "SampleResult",
    "SlidePlan",
    "plan_slide",
    "tile_slide",
    "tiling_params",
    "write_samples",
]

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
class SamplePlan:
    """One sample of an input, laid out and ready for :func:`write_samples` (picklable: a worker can take it).

    Attributes:
        path: The input file.
        sample_id: ``slide`` or ``slide/core``.
        input_sha256: SHA-256 of the input file.
        params: :func:`tiling_params` of the run (keys the finished store).
        input_mpp: µm per level-0 pixel overriding the metadata (None: the file's own).
        analysis_mpp: The resolution tiles are read at (None: native level-0 pixels).
        grid: The sample's tiles.
        mask: The thumbnail tissue mask under the sample.
        mask_l_origin: Analysis-pixel position of the mask's origin.
        mask_downsample: Analysis pixels per mask pixel.
        attrs: Metadata stored with the sample.
        warnings: One-line warnings of the input.
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


@dataclass
class SlidePlan:
    """What tiling one input takes: :func:`plan_slide`'s result.

    Attributes:
        path: The input file.
        input_sha256: Its SHA-256.
        sample_ids: Every sample of the input, in order ((row, col) for TMA cores).
        todo: Samples still to write.
        finished: Samples already finished from the same input bytes and parameters.
    """

    path: str
    input_sha256: str
    sample_ids: list[str]
    todo: list[SamplePlan]
    finished: list[SampleResult]

    def ordered(self, written: list[SampleResult]) -> list[SampleResult]:
        """``finished`` and ``written`` in the input's sample order."""
        rank = {sid: i for i, sid in enumerate(self.sample_ids)}
        return sorted([*self.finished, *written], key=lambda r: rank[r.sample_id])


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

    The same as :func:`plan_slide` then :func:`write_samples` on every sample in one process; a
    cluster runs the two apart, one ``write_samples`` per group of TMA cores.

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
    plan = plan_slide(
        path,
        out_root,
        sample_id=sample_id,
        mpp=mpp,
        tile=tile,
        halo=halo,
        input_mpp=input_mpp,
        tma=tma,
        input_sha256=input_sha256,
    )
    return plan.ordered(write_samples(plan.todo, out_root, progress=progress))


def plan_slide(
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
) -> SlidePlan:
    """Open, hash and mask one input, dearray it when it is a TMA, and lay out each sample's tiles.

    Reads only the thumbnail. Samples already finished under ``out_root`` from the same input bytes
    and parameters come back in ``finished``; the rest in ``todo``, for :func:`write_samples`.
    Arguments and errors: as :func:`tile_slide`.
    """
    from equislide.storage import is_sample_done, safe_sample_id, sample_store_path, sha256_file

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
            done = _skipped(out_root, slide_id, sha, sample_store_path)
            return SlidePlan(str(path), sha, [slide_id], [], [done])

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
                layout.append((f"{slide_id}/{safe_sample_id(core.name)}", grid, crop, origin, extra))
        else:
            grid = tissue_grid(mask, l_size=l_size, l_per_m=l_per_m, tile=tile, halo=halo, l0_per_l=l0_per_l)
            layout.append((slide_id, grid, mask, (0.0, 0.0), {"kind": "slide"}))

    plan = SlidePlan(str(path), sha, [sid for sid, *_ in layout], [], [])
    for sid, grid, crop, origin, extra in layout:
        if is_sample_done(out_root, sid, input_sha256=sha, params=params):
            plan.finished.append(_skipped(out_root, sid, sha, sample_store_path, warnings))
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
            )
        )
    return plan


def write_samples(
    samples: list[SamplePlan],
    out_root: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
) -> list[SampleResult]:
    """Read and store the tiles of planned samples (of one input), each store written atomically.

    Opens the input once for all of ``samples``. A sample finished in the meantime (another run over
    the same folder) is skipped.

    Raises:
        SlideError: The input cannot be opened or read.
        ValueError: The samples come from more than one input.
    """
    from equislide.storage import is_sample_done, open_sample_for_write, sample_store_path

    if not samples:
        return []
    if len({(s.path, s.input_mpp) for s in samples}) > 1:
        raise ValueError("write_samples takes the samples of one input; got several")
    results = []
    with open_slide(samples[0].path, input_mpp=samples[0].input_mpp) as slide:
        for sample in samples:
            sha, params = sample.input_sha256, sample.params
            if is_sample_done(out_root, sample.sample_id, input_sha256=sha, params=params):
                results.append(
                    _skipped(out_root, sample.sample_id, sha, sample_store_path, list(sample.warnings))
                )
                continue
            t0 = time.perf_counter()
            grid = sample.grid
            with open_sample_for_write(
                out_root,
                sample.sample_id,
                n_tiles=grid.n_tiles,
                tile=grid.tile,
                halo=grid.halo,
                attrs=sample.attrs,
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
                        batch[i - start] = slide.read_region_mpp(
                            l0_xy, (grid.side, grid.side), sample.analysis_mpp
                        )
                    writer.write_tiles(start, batch, grid.l_xy[start:stop])
                    if progress is not None:
                        progress(sample.sample_id, stop, grid.n_tiles)
                writer.write_tissue_mask(sample.mask, downsample=sample.mask_downsample)
            results.append(
                SampleResult(
                    sample.sample_id,
                    writer.path,
                    "written",
                    grid.n_tiles,
                    grid.side,
                    sha,
                    list(sample.warnings),
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

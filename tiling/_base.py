"""The :class:`Slide` contract shared by every reader.

Coordinate planes (as in ``openslide/deepzoom.py``):

- ``l0_``: pixel (x, y) in pyramid level 0, the full-resolution image; x to the right, y down.
- ``lv_``: pixel (x, y) in the chosen pyramid level (``l_`` is the analysis plane: see
  :mod:`equislide.tiling`).
- output pixels: the (row, col) of the returned ``(H, W, 3)`` array.

Sizes are always ``(width, height)``; arrays are always ``(height, width, 3)`` RGB uint8 with
empty, transparent or out-of-image areas white.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from ._errors import SlideTooLargeError
from ._mpp import MPP_RANGE, MppChoice, resolve_mpp

__all__ = ["MAX_BLOCK_BYTES", "MAX_READ_PIXELS", "MAX_THUMBNAIL_READ_PIXELS", "Slide", "plausible_mpp"]

#: Largest block :meth:`Slide.read_tiles_mpp` reads at once (RGBA bytes): a 4096 x 4096 level region.
MAX_BLOCK_BYTES = 64 * 2**20
#: Largest single read (pixels) :meth:`Slide.read_region` accepts, ~0.8 GB of RGB.
MAX_READ_PIXELS = 2**28
#: A pyramid level within this relative tolerance of a requested downsample still counts as "not
#: coarser than requested" (pyramids store 2.0003 for a nominal 2).
_LEVEL_TOLERANCE = 0.01
#: Thumbnails are read in strips of at most this many level pixels, bounding memory.
_STRIP_PIXELS = 2**22
#: A thumbnail never reads more pixels than this from one level (~16k x 16k): a slide with no
#: pyramid level small enough is refused in one line instead of decoding minutes of level 0.
MAX_THUMBNAIL_READ_PIXELS = 2**28


def plausible_mpp(value: float | None) -> float | None:
    """Return ``value`` (µm/px) if it lies in the plausible microscope range, else ``None``."""
    if value is None or not math.isfinite(value):
        return None
    return value if MPP_RANGE[0] <= value <= MPP_RANGE[1] else None


#: Box edges are snapped to 1/_SNAP level pixel, so the area weights are whole numbers (exact sums).
_SNAP = 1024


def _snapped_edges(edges: np.ndarray, limit: int) -> np.ndarray:
    """int64 box edges in 1/_SNAP pixels, clipped to the source's ``[0, limit)``."""
    return np.clip(np.rint(edges * _SNAP).astype(np.int64), 0, limit * _SNAP)


def _axis_sums(a: np.ndarray, edges: np.ndarray, axis: int, dtype: type) -> np.ndarray:
    """Sums of ``a`` along ``axis`` over the boxes between consecutive ``edges`` (1/_SNAP px), each
    source pixel weighted by the length of its overlap with the box, in ``dtype``."""
    lo, hi = edges[:-1], edges[1:]
    first = lo // _SNAP
    taps = int(max(1, (-(-hi // _SNAP) - first).max()))
    last = a.shape[axis] - 1
    shape = [1] * a.ndim
    shape[axis] = len(lo)
    out = None
    for t in range(taps):
        j = first + t
        weight = np.clip(np.minimum(hi, (j + 1) * _SNAP) - np.maximum(lo, j * _SNAP), 0, None)
        term = np.take(a, np.minimum(j, last), axis=axis) * weight.astype(dtype).reshape(shape)
        out = term if out is None else out + term
    return out


def _area_mean(a: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 area means of ``a`` over the boxes between the given edges (1/_SNAP px).

    Integer arithmetic throughout: each output is the exact weighted sum of its box, rounded half
    up once, whatever the order of the axes, so it commutes with rotations and flips of ``a``.
    """
    # Rows first (whole-row gathers, on the larger array); 255 * _SNAP * rows per box fits int32.
    sums = _axis_sums(_axis_sums(a, y_edges, axis=0, dtype=np.int32), x_edges, axis=1, dtype=np.int64)
    area = np.diff(y_edges)[:, None, None] * np.diff(x_edges)[None, :, None]
    area = np.maximum(area, 1)
    return ((sums + area // 2) // area).astype(np.uint8)


def _blocks(
    l0_xys: np.ndarray,
    plan: _MppRead,
    ds: int,
    grid: tuple[int, int],
    max_bytes: int,
):
    """Yield ``(block, members)``: ``block = (l0_xy, lv_xy, lv_size)`` of one level region holding
    the reads of the tiles ``members`` (indices into ``l0_xys``), or ``None`` for tiles read alone.

    Members share ``l0_y`` and ``l0_x mod ds``, so each read starts a whole number of level pixels
    from the block's origin; a block stops at a gap wider than one stored tile (it would paint
    pixels no tile needs) and at ``max_bytes``. A block spans its members' reads only: OpenSlide
    decodes every stored tile a read touches whole, so widening a block to the stored-tile grid
    would paint more pixels without saving a decode.
    """
    tw, (lv_w, lv_h) = grid[0], plan.lv_size
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (l0_x, l0_y) in enumerate(l0_xys.tolist()):
        if l0_x < 0 or l0_y < 0:
            # OpenSlide reads a region that starts left of or above the image from its edge, not at
            # the sub-pixel offset a block would put it at: such tiles are read alone.
            yield None, [i]
            continue
        groups.setdefault((l0_y, l0_y % ds, l0_x % ds), []).append(i)
    for (l0_y, r_y, r_x), members in groups.items():
        members.sort(key=lambda i: int(l0_xys[i, 0]))
        lv_y = (l0_y - r_y) // ds
        by0, by1 = lv_y, lv_y + lv_h
        runs: list[tuple[list[int], int, int]] = []  # (members, lv_x0, lv_x1) of each block
        for i in members:
            lv_x = (int(l0_xys[i, 0]) - r_x) // ds
            x0, x1 = lv_x, lv_x + lv_w
            if runs:
                run, bx0, bx1 = runs[-1]
                if x0 - bx1 <= tw and (max(bx1, x1) - bx0) * (by1 - by0) * 4 <= max_bytes:
                    run.append(i)
                    runs[-1] = (run, bx0, max(bx1, x1))
                    continue
            runs.append(([i], x0, x1))
        for run, bx0, bx1 in runs:
            if len(run) == 1 or (bx1 - bx0) * (by1 - by0) * 4 > max_bytes:
                yield None, run
            else:
                yield ((bx0 * ds + r_x, by0 * ds + r_y), (bx0, by0), (bx1 - bx0, by1 - by0)), run


def _as_int_pair(value: tuple[int, int], name: str) -> tuple[int, int]:
    try:
        a, b = value
        return operator.index(a), operator.index(b)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}={value!r} must be a pair of integers") from err


@dataclass(frozen=True)
class _MppRead:
    """One :meth:`Slide.read_region_mpp` read: level, level pixels read, output size, and the level
    pixels per output pixel ``f`` ((1, 1): the level read is the output)."""

    level: int
    lv_size: tuple[int, int]
    out_size: tuple[int, int]
    f: tuple[float, float]

    def finish(self, img: Image.Image) -> np.ndarray:
        """Resample the level pixels read (RGB, ``lv_size``) to the output, (H, W, 3) uint8."""
        if self.f == (1.0, 1.0):
            return np.array(img)
        (width, height), (f_x, f_y) = self.out_size, self.f
        whole = (round(f_x), round(f_y))
        if self.lv_size == (width * whole[0], height * whole[1]) and min(whole) >= 1:
            # Whole factors (0.25 -> 2.5 µm/px): PIL's block mean sums each block at once, so the
            # result commutes with rotations and flips of the slide; resize's two rounded passes
            # (x then y) are one grey level off here and there once x and y swap.
            return np.array(img.reduce(whole))
        resample = Image.Resampling.BOX if min(f_x, f_y) >= 1.0 else Image.Resampling.BILINEAR
        box = (0.0, 0.0, min(width * f_x, self.lv_size[0]), min(height * f_y, self.lv_size[1]))
        return np.array(img.resize((width, height), resample, box=box))


class Slide(ABC):
    """A whole-slide image or a plain image, read as RGB uint8 at any pyramid level or resolution.

    Use :func:`~equislide.tiling.open_slide` rather than a subclass: it picks the reader. Slides are
    context managers; ``close()`` releases the file.

    Attributes:
        path: The file that was opened.
    """

    def __init__(self, path: Path, *, input_mpp: float | None = None, force_mpp: float | None = None) -> None:
        for name, value in (("input_mpp", input_mpp), ("force_mpp", force_mpp)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number of µm per pixel")
        if input_mpp is not None and force_mpp is not None:
            raise ValueError(
                "give input_mpp (fills in missing metadata) or force_mpp (overrides it), not both"
            )
        self.path = path
        self._input_mpp = None if input_mpp is None else float(input_mpp)
        self._force_mpp = None if force_mpp is None else float(force_mpp)

    # --- implemented by each reader -------------------------------------------------------------

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) in pixels of each pyramid level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per level pixel of each level (1.0 for level 0)."""

    @property
    @abstractmethod
    def properties(self) -> dict[str, str]:
        """Format metadata as strings (OpenSlide property names where the reader is OpenSlide)."""

    @property
    @abstractmethod
    def associated_images(self) -> dict[str, np.ndarray]:
        """Other images in the file (thumbnail, label, macro) as (H, W, 3) uint8 RGB."""

    @abstractmethod
    def _metadata_mpp(self) -> tuple[float, float] | str | None:
        """(x, y) µm per level-0 pixel as the file states it (unchecked: may be nan, 0, huge), a
        string saying what could not be parsed, or ``None`` when the file states no resolution."""

    def _objective_power(self) -> float | None:
        """The objective magnification the file states (e.g. 20.0), or ``None``."""
        return None

    @abstractmethod
    def _read_image(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """Read an RGB PIL image; arguments already validated (see :meth:`read_region`)."""

    @abstractmethod
    def close(self) -> None:
        """Release the file; further reads are undefined."""

    # --- shared ----------------------------------------------------------------------------------

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels (1 for plain images)."""
        return len(self.level_dimensions)

    @cached_property
    def _mpp_choice(self) -> MppChoice:
        return resolve_mpp(
            self._metadata_mpp(),
            dimensions=self.dimensions,
            objective_power=self._objective_power(),
            input_mpp=self._input_mpp,
            force_mpp=self._force_mpp,
        )

    @property
    def mpp(self) -> tuple[float, float] | None:
        """(x, y) µm per level-0 pixel: ``force_mpp``, else usable metadata, else ``input_mpp``, else
        ``None`` (rules: :mod:`equislide.tiling._mpp`)."""
        return self._mpp_choice.mpp

    @property
    def mpp_source(self) -> str | None:
        """Where :attr:`mpp` came from: ``"metadata"``, ``"input_mpp"`` (filled in where the metadata
        had none usable), ``"override"`` (``force_mpp``) or ``None``."""
        return self._mpp_choice.source

    @property
    def mpp_problem(self) -> str | None:
        """Why the metadata gives no usable mpp ("metadata mpp nan µm/px is not a positive number"),
        or ``None`` when it does."""
        return self._mpp_choice.problem

    @property
    def mpp_warnings(self) -> tuple[str, ...]:
        """One-line warnings about :attr:`mpp` (``input_mpp`` contradicting the metadata, ...)."""
        return self._mpp_choice.warnings

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1 % tolerance).

        Args:
            downsample: Wanted level-0 pixels per output pixel.

        Returns:
            A level index; 0 when ``downsample`` <= 1.
        """
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * (1.0 + _LEVEL_TOLERANCE) and level_ds >= self.level_downsamples[best]:
                best = level
        return best

    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read pixels of one pyramid level.

        Args:
            l0_xy: (x, y) of the top-left pixel in the level-0 plane (px). May lie outside.
            level: Pyramid level, 0 to ``level_count - 1``.
            size: (width, height) of the region in level-``level`` pixels.

        Returns:
            (height, width, 3) uint8 RGB; areas outside the image or transparent are white.

        Raises:
            IndexError: ``level`` out of range.
            ValueError: A non-positive or oversized ``size``.
            CorruptSlideError: The file fails to decode in this region.
        """
        l0_xy, size = self._check_read(l0_xy, level, size)
        return np.array(self._read_image(l0_xy, level, size))

    def read_region_mpp(self, l0_xy: tuple[int, int], size: tuple[int, int], mpp: float | None) -> np.ndarray:
        """Read ``size`` pixels at resolution ``mpp`` whose top-left is ``l0_xy``.

        Reads the coarsest pyramid level that is at least as fine as ``mpp`` and resamples it with
        PIL: box (area-average) filtering when shrinking, which is alias-free for the integer
        ratios of pyramids and fast; bilinear when enlarging. The output pixel (row, col) covers the
        level-0 area ``[l0_x + col * s_x, l0_x + (col + 1) * s_x)`` by the same along y, with
        ``s = mpp / slide.mpp``.

        Args:
            l0_xy: (x, y) of the top-left corner in level-0 pixels.
            size: (width, height) of the output in pixels at ``mpp``.
            mpp: Output resolution in µm per pixel. ``None`` means native level-0 pixels (the only
                choice when :attr:`mpp` is ``None``: a slide without a resolution cannot be read at
                a physical one; pass ``input_mpp`` to :func:`open_slide` instead).

        Returns:
            (height, width, 3) uint8 RGB, white outside the image.

        Raises:
            ValueError: ``mpp`` given but the slide has no resolution, or ``mpp`` <= 0.
        """
        if mpp is None:
            return self.read_region(l0_xy, 0, size)
        plan = self._mpp_plan(size, mpp)
        l0_xy, _ = self._check_read(l0_xy, plan.level, plan.lv_size)
        return plan.finish(self._read_image(l0_xy, plan.level, plan.lv_size))

    def _mpp_plan(self, size: tuple[int, int], mpp: float | None) -> _MppRead:
        """What :meth:`read_region_mpp` reads for an output of ``size`` at ``mpp``: the same for every
        position, so a block reader can read many tiles' level regions at once and finish each alike."""
        if mpp is None:
            size = _as_int_pair(size, "size")
            self._check_read((0, 0), 0, size)
            return _MppRead(0, size, size, (1.0, 1.0))
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp={mpp!r} must be a positive number of µm per pixel")
        if self.mpp is None:
            raise ValueError(
                f"{self.path.name}: no resolution in metadata, so mpp={mpp} cannot be honoured; "
                "open it with input_mpp=... or read with mpp=None (level-0 pixels)"
            )
        width, height = _as_int_pair(size, "size")
        ds_x, ds_y = mpp / self.mpp[0], mpp / self.mpp[1]
        level = self.best_level_for_downsample(min(ds_x, ds_y))
        level_ds = self.level_downsamples[level]
        # Level pixels per output pixel along x and y.
        f_x, f_y = ds_x / level_ds, ds_y / level_ds
        if abs(f_x - 1.0) < 1e-3 and abs(f_y - 1.0) < 1e-3:
            _, out = self._check_read((0, 0), level, (width, height))
            return _MppRead(level, out, out, (1.0, 1.0))
        lv_size = (max(1, math.ceil(width * f_x - 1e-6)), max(1, math.ceil(height * f_y - 1e-6)))
        _, lv_size = self._check_read((0, 0), level, lv_size)
        _, out = self._check_read((0, 0), 0, (width, height))
        return _MppRead(level, lv_size, out, (f_x, f_y))

    def _block_tile_size(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the file's own stored tiles at ``level`` when a read of a larger region
        at ``level`` holds, pixel for pixel, the reads of the regions inside it; ``None`` (the
        default) makes block readers read every tile on its own."""
        return None

    def read_tiles_mpp(
        self,
        l0_xys: np.ndarray,
        size: tuple[int, int],
        mpp: float | None,
        *,
        max_block_bytes: int | None = MAX_BLOCK_BYTES,
    ) -> np.ndarray:
        """:meth:`read_region_mpp` of many tiles of one ``size``, the same pixels bit for bit, read in
        blocks aligned to the file's own tiles where the reader allows it.

        Tiles on one row (equal ``l0_y``) whose level regions lie near each other are read as one region
        of the pyramid level (blocks break where the reads are more than one stored (JPEG) tile of that
        level apart), and each tile is cut from it at the level position its own read would start at, then
        resampled as :meth:`read_region_mpp` does: every stored tile is decoded once per block instead of
        once per output tile that touches it. A block is exact only where a level position is a whole
        level pixel away from the block's, so blocks are used at level 0 and at levels whose downsample is
        a power of two (tiles grouped by ``l0_x`` modulo it); at other levels (e.g. an SVS level of
        downsample 4.0003, where OpenSlide resamples each read at its sub-pixel offset) and for readers
        without a stored-tile grid every tile is read alone.

        Args:
            l0_xys: int (n, 2) level-0 (x, y) of each tile's top-left corner (px).
            size: (width, height) of every tile at ``mpp`` (px).
            mpp: Output resolution (µm/px), or ``None`` for level-0 pixels.
            max_block_bytes: Largest block (RGBA bytes) read at once; ``None`` reads tile by tile.

        Returns:
            (n, height, width, 3) uint8 RGB, in the order of ``l0_xys``.
        """
        l0_xys = np.asarray(l0_xys, dtype=np.int64).reshape(-1, 2)
        plan = self._mpp_plan(size, mpp)
        width, height = plan.out_size
        out = np.empty((len(l0_xys), height, width, 3), np.uint8)
        lone = list(range(len(l0_xys)))
        grid = None if max_block_bytes is None else self._block_tile_size(plan.level)
        ds = self.level_downsamples[plan.level]
        if grid is not None and ds.is_integer() and (int(ds) & (int(ds) - 1)) == 0:
            lone = []
            for block, members in _blocks(l0_xys, plan, int(ds), grid, max_block_bytes):
                if block is None:
                    lone.extend(members)
                    continue
                l0_b, _, lv_b_size = block
                l0_b, lv_b_size = self._check_read(l0_b, plan.level, lv_b_size)
                img = self._read_image(l0_b, plan.level, lv_b_size)
                for i in members:
                    # Whole level pixels by construction: ds divides l0 - l0_b exactly.
                    n_x = int(l0_xys[i, 0] - l0_b[0]) // int(ds)
                    n_y = int(l0_xys[i, 1] - l0_b[1]) // int(ds)
                    crop = img.crop((n_x, n_y, n_x + plan.lv_size[0], n_y + plan.lv_size[1]))
                    out[i] = plan.finish(crop)
                del img
        for i in lone:
            l0_xy, _ = self._check_read((int(l0_xys[i, 0]), int(l0_xys[i, 1])), plan.level, plan.lv_size)
            out[i] = plan.finish(self._read_image(l0_xy, plan.level, plan.lv_size))
        return out

    def thumbnail(
        self, *, max_size: int = 2048, max_read_pixels: int = MAX_THUMBNAIL_READ_PIXELS
    ) -> tuple[np.ndarray, float]:
        """A downsampled view of the whole image, from the best pyramid level.

        Args:
            max_size: Longest side of the thumbnail in pixels; images smaller than this are
                returned at level 0.
            max_read_pixels: Refuse when the level read holds more pixels than this.

        Returns:
            ``(rgb, downsample)``: (H, W, 3) uint8 RGB and the level-0 pixels per thumbnail pixel
            along x (y agrees up to the rounding of the thumbnail's height). A thumbnail pixel
            (row, col) is the area mean of level-0 x in ``[col * downsample, (col + 1) * downsample)``
            (and y alike), partly covered pixels weighted by their share: the same for every
            pixel and both axes, so the thumbnail of a rotated or mirrored single-level image is
            the rotated or mirrored thumbnail, exactly (PIL's ``BOX`` resize is not: it gives a
            pixel on a box edge wholly to the box on its right, and rounds between its x and y
            passes).

        Raises:
            SlideTooLargeError: The finest level needed holds more than ``max_read_pixels``
                (a huge image without a pyramid), refused before any pixel is read.
        """
        if operator.index(max_size) < 1:
            raise ValueError(f"max_size={max_size!r} must be a positive number of pixels")
        l0_w, l0_h = self.dimensions
        scale = max(1.0, max(l0_w, l0_h) / max_size)
        # thumb_: pixel (x, y) in the thumbnail; lv_: in the pyramid level read.
        thumb_w, thumb_h = max(1, round(l0_w / scale)), max(1, round(l0_h / scale))
        ds_x, ds_y = l0_w / thumb_w, l0_h / thumb_h
        level = self.best_level_for_downsample(min(ds_x, ds_y))
        level_ds = self.level_downsamples[level]
        lv_w, lv_h = self.level_dimensions[level]
        if lv_w * lv_h > max_read_pixels:
            pyramid = (
                "no pyramid" if self.level_count == 1 else f"no pyramid level under {max_read_pixels} px"
            )
            raise SlideTooLargeError(
                self.path,
                f"{l0_w}x{l0_h} px with {pyramid}: a thumbnail would decode {lv_w}x{lv_h} px, "
                f"above the limit of {max_read_pixels} px",
                detail="save it as a pyramidal (tiled, multi-resolution) TIFF",
            )
        f_x, f_y = ds_x / level_ds, ds_y / level_ds  # level px per thumbnail px
        out = np.empty((thumb_h, thumb_w, 3), dtype=np.uint8)
        rows_per_strip = max(1, int(_STRIP_PIXELS / max(1.0, lv_w * f_y)))
        for thumb_y0 in range(0, thumb_h, rows_per_strip):
            thumb_y1 = min(thumb_h, thumb_y0 + rows_per_strip)
            lv_y0, lv_y1 = thumb_y0 * f_y, thumb_y1 * f_y
            lv_row0 = min(int(math.floor(lv_y0)), lv_h - 1)
            lv_row1 = max(lv_row0 + 1, min(lv_h, math.ceil(lv_y1 - 1e-6)))
            img = self._read_image((0, round(lv_row0 * level_ds)), level, (lv_w, lv_row1 - lv_row0))
            strip_size = (thumb_w, thumb_y1 - thumb_y0)
            if strip_size == img.size:
                out[thumb_y0:thumb_y1] = np.asarray(img)
                continue
            x_edges = _snapped_edges(np.arange(thumb_w + 1) * f_x, lv_w)
            y_edges = _snapped_edges(np.arange(thumb_y0, thumb_y1 + 1) * f_y, lv_h) - lv_row0 * _SNAP
            out[thumb_y0:thumb_y1] = _area_mean(np.asarray(img), x_edges, y_edges)
        return out, ds_x

    def _check_read(
        self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        l0_xy = _as_int_pair(l0_xy, "l0_xy")
        size = _as_int_pair(size, "size")
        if not 0 <= operator.index(level) < self.level_count:
            raise IndexError(f"level={level} out of range (slide has {self.level_count} levels)")
        if size[0] < 1 or size[1] < 1:
            raise ValueError(f"size={size} must be positive (width, height)")
        if size[0] * size[1] > MAX_READ_PIXELS:
            raise ValueError(f"size={size} reads more than {MAX_READ_PIXELS} pixels at once; read tiles")
        return l0_xy, size

    def _reopen_kwargs(self) -> dict[str, object]:
        """Keyword arguments that reopen this slide (see :meth:`__reduce__`)."""
        return {"input_mpp": self._input_mpp, "force_mpp": self._force_mpp}

    def __reduce__(self):
        """Pickle by path: the copy reopens the file (a Dask worker gets its own file handle)."""
        return (_reopen, (type(self), self.path, self._reopen_kwargs()))

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def _reopen(cls: type[Slide], path: Path, kwargs: dict[str, object]) -> Slide:
    return cls(path, **kwargs)

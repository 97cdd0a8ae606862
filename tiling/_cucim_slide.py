"""Whole-slide images through NVIDIA cuCIM (optional; TIFF family: Aperio SVS incl. JPEG 2000,
Philips TIFF, generic tiled or stripped TIFF).

cuCIM is not a dependency: it is imported only when a :class:`CuCIMSlide` is made, i.e. by
``open_slide(path, backend="cucim")``. Pixels are decoded on the CPU and returned as numpy.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._base import Slide, plausible_mpp
from ._errors import CorruptSlideError, NotASlideError, UnsupportedImageError
from ._image_slide import sniff_format
from ._openslide_slide import _UNIT_TO_UM
from ._rgb import to_rgb8

__all__ = ["CUCIM_INSTALL_HINT", "CuCIMSlide", "import_cucim"]

#: How to get cuCIM; shown when ``backend="cucim"`` is asked for without it.
CUCIM_INSTALL_HINT = "pip install cucim-cu12"


def import_cucim(path: Path) -> Any:
    """Import and return the ``cucim`` module.

    Raises:
        ValueError: cuCIM is not installed (a choice of ``backend``, not a bad file, so not a
            :class:`~equislide.tiling.SlideError` that a run would skip as one bad sample).
    """
    try:
        import cucim
    except ImportError as err:
        raise ValueError(
            f"{path.name}: backend='cucim' needs cuCIM, which is not installed: {CUCIM_INSTALL_HINT} "
            f"(or use backend='auto'); import failed: {err}"
        ) from err
    return cucim


def _metadata_dict(raw: object) -> dict[str, Any]:
    """cuCIM metadata as a dict (older versions give a JSON string)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return raw if isinstance(raw, dict) else {}


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """cuCIM's (H, W, 3) RGB or slow-path (H, W, 4) premultiplied RGBA to RGB on white."""
    if arr.shape[-1] == 3:
        return np.ascontiguousarray(arr)
    alpha = arr[..., 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(arr[..., :3])
    # libtiff's RGBA interface premultiplies: on white, c_premul + (255 - alpha).
    return np.minimum(arr[..., :3].astype(np.uint16) + (255 - alpha), 255).astype(np.uint8)


class CuCIMSlide(Slide):
    """A slide read by NVIDIA cuCIM (optional, ``pip install cucim-cu12``).

    Same contract as :class:`~equislide.tiling.OpenSlideSlide`: level metadata equal to
    OpenSlide's, mpp from ``aperio.MPP`` then the TIFF resolution tags, RGB uint8 white outside
    the image. At level 0 the pixels equal OpenSlide's (same JPEG / JPEG 2000 decoding). At levels
    above 0 a region starts at the level pixel nearest to ``l0_xy / downsample`` (at most half a
    level pixel off), whereas OpenSlide resamples at the fractional position, so off the origin
    the two differ by interpolation.

    .. warning::

        cuCIM logs an undecodable tile to stderr and returns filler pixels instead of raising, so
        a broken tile is not always reported as :class:`~equislide.tiling.CorruptSlideError`.

    Args:
        path: The slide file.
        input_mpp: µm per level-0 pixel filling in missing or unusable metadata.
        force_mpp: µm per level-0 pixel replacing the metadata.

    Raises:
        ValueError: cuCIM is not installed.
        NotASlideError: Neither a format cuCIM reads nor any known image format.
        UnsupportedImageError: A known image format that cuCIM has no plugin for (PNG, JPEG, ...).
        CorruptSlideError: A TIFF that cuCIM cannot load (truncated, broken directory).
    """

    def __init__(self, path: Path, *, input_mpp: float | None = None, force_mpp: float | None = None) -> None:
        super().__init__(path, input_mpp=input_mpp, force_mpp=force_mpp)
        cucim = import_cucim(path)
        try:
            self._img = cucim.CuImage(str(path))
        except (ValueError, RuntimeError) as err:
            raise self._open_error(err) from err
        res = self._img.resolutions
        self._level_dimensions = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        self._level_downsamples = tuple(float(d) for d in res["level_downsamples"])

    def _open_error(self, err: Exception) -> Exception:
        try:
            with open(self.path, "rb") as fh:
                fmt = sniff_format(fh.read(16))
        except OSError:
            fmt = None
        detail = f"cuCIM: {err}"
        if fmt is None:
            return NotASlideError(self.path, "not a slide or image", detail=detail)
        if "plugin" in str(err):
            return UnsupportedImageError(
                self.path, f"cuCIM does not read {fmt}; use backend='auto'", detail=detail
            )
        return CorruptSlideError(self.path, f"cuCIM cannot read this {fmt}", detail=detail)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @cached_property
    def _metadata(self) -> dict[str, Any]:
        return _metadata_dict(self._img.metadata)

    @cached_property
    def properties(self) -> dict[str, str]:
        """cuCIM metadata flattened to ``"<section>.<key>"`` (``aperio.MPP`` as in OpenSlide)."""
        out = {"equislide.reader": "cucim"}
        for section, values in self._metadata.items():
            if isinstance(values, dict):
                out.update({f"{section}.{key}": str(value) for key, value in values.items()})
            else:
                out[str(section)] = str(values)
        return out

    @cached_property
    def associated_images(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        try:
            for name in sorted(self._img.associated_images):
                arr = np.asarray(self._img.associated_image(name))
                out[name] = _to_rgb(arr) if arr.ndim == 3 and arr.shape[-1] in (3, 4) else to_rgb8(arr)
        except (ValueError, RuntimeError) as err:
            raise CorruptSlideError(
                self.path, "cannot decode associated image", detail=f"cuCIM: {err}"
            ) from err
        return out

    def _metadata_mpp(self) -> tuple[float, float] | None:
        # OpenSlide's precedence: the vendor's mpp (openslide.mpp-x, from aperio.MPP), then tiff.
        mpp: tuple[float, float] | None
        try:
            value = float(self._metadata["aperio"]["MPP"])
            mpp = (value, value)
        except (KeyError, TypeError, ValueError):
            tiff = self._metadata.get("tiff", {})
            unit = _UNIT_TO_UM.get(str(tiff.get("resolution_unit", "")))
            try:
                mpp = (
                    None
                    if unit is None
                    else (unit / float(tiff["x_resolution"]), unit / float(tiff["y_resolution"]))
                )
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                mpp = None
        if mpp is None or plausible_mpp(mpp[0]) is None or plausible_mpp(mpp[1]) is None:
            return None
        return mpp

    def _l0_for_level_px(self, lv_px: int, level_ds: float) -> int:
        """The level-0 coordinate cuCIM maps to level pixel ``lv_px`` (it takes ``int(l0 / ds)``)."""
        l0 = math.ceil(lv_px * level_ds)
        while int(l0 / level_ds) > lv_px:  # float rounding at the boundary
            l0 -= 1
        while int(l0 / level_ds) < lv_px:
            l0 += 1
        return l0

    def _plan(
        self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int], tuple[slice, slice]] | None:
        """Where cuCIM reads ``size`` level px at ``l0_xy``: ``(location, read size, where it lands in
        the output)``, or None when nothing of it is inside the level."""
        # The level pixel nearest to l0_xy / downsample (OpenSlide resamples at the fractional
        # position; cuCIM would truncate, up to one level pixel off). cuCIM refuses sizes beyond the
        # level and fills outside areas black (TIFF) or white (SVS), so read only the part inside the
        # level and paste it on white.
        level_ds = self._level_downsamples[level]
        lv_w, lv_h = self._level_dimensions[level]
        lv_x0, lv_y0 = math.floor(l0_xy[0] / level_ds + 0.5), math.floor(l0_xy[1] / level_ds + 0.5)
        lv_x_lo, lv_y_lo = max(lv_x0, 0), max(lv_y0, 0)
        lv_x_hi, lv_y_hi = min(lv_x0 + size[0], lv_w), min(lv_y0 + size[1], lv_h)
        if lv_x_hi <= lv_x_lo or lv_y_hi <= lv_y_lo:
            return None
        if level == 0:
            location = (lv_x_lo, lv_y_lo)
        else:
            location = (self._l0_for_level_px(lv_x_lo, level_ds), self._l0_for_level_px(lv_y_lo, level_ds))
        where = (slice(lv_y_lo - lv_y0, lv_y_hi - lv_y0), slice(lv_x_lo - lv_x0, lv_x_hi - lv_x0))
        return location, (lv_x_hi - lv_x_lo, lv_y_hi - lv_y_lo), where

    def _read_image(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        out = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
        plan = self._plan(l0_xy, level, size)
        if plan is None:
            return Image.fromarray(out)
        location, read_size, where = plan
        try:
            arr = np.asarray(self._img.read_region(location=location, size=read_size, level=level))
        except (ValueError, RuntimeError) as err:
            raise CorruptSlideError(
                self.path, f"cannot decode region at l0_xy={l0_xy}, level={level}", detail=f"cuCIM: {err}"
            ) from err
        out[where] = _to_rgb(arr)
        return Image.fromarray(out)

    def read_region_device(
        self, l0_xy: tuple[int, int], level: int, size: tuple[int, int], *, device: str = "cuda"
    ) -> Any:
        """:meth:`read_region` decoded by cuCIM on the GPU (nvJPEG / nvImageCodec where cuCIM has them
        for the file's compression): a cupy ``(height, width, 3)`` uint8 array on ``device``, white
        outside the image, the same pixels :meth:`read_region` gives up to the decoders' rounding.

        Raises:
            ValueError: cupy is missing (it holds the result).
            CorruptSlideError: The file fails to decode in this region.
        """
        from equislide.arrays import CUPY_INSTALL_HINT, cupy_or_none

        cp = cupy_or_none()
        if cp is None:
            raise ValueError(f"{self.path.name}: a GPU read needs cupy and a GPU: {CUPY_INSTALL_HINT}")
        l0_xy, size = self._check_read(l0_xy, level, size)
        out = cp.full((size[1], size[0], 3), 255, dtype=cp.uint8)
        plan = self._plan(l0_xy, level, size)
        if plan is None:
            return out
        location, read_size, where = plan
        try:
            region = self._img.read_region(location=location, size=read_size, level=level, device=device)
        except (ValueError, RuntimeError) as err:
            raise CorruptSlideError(
                self.path, f"cannot decode region at l0_xy={l0_xy}, level={level}", detail=f"cuCIM: {err}"
            ) from err
        arr = cp.asarray(region)  # a device CuImage exposes __cuda_array_interface__: no host copy
        if arr.shape[-1] == 4:  # the slow path's premultiplied RGBA, on white as _to_rgb does it
            alpha = arr[..., 3:4].astype(cp.uint16)
            arr = cp.minimum(arr[..., :3].astype(cp.uint16) + (255 - alpha), 255).astype(cp.uint8)
        out[where] = arr
        return out

    def close(self) -> None:
        self._img.close()

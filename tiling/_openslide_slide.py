"""Whole-slide images through OpenSlide (every format OpenSlide 4 opens: SVS, NDPI, MRXS, SCN,
generic tiled TIFF, DICOM, ...)."""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from ._base import Slide
from ._errors import CorruptSlideError
from ._rgb import composite_on_white

__all__ = ["OpenSlideSlide"]

_UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0}


def _rgba_to_rgb_image(img: Image.Image) -> Image.Image:
    """OpenSlide's straight-alpha RGBA to RGB on white."""
    if img.mode != "RGBA":
        return img.convert("RGB")
    alpha_lo, _ = img.getchannel("A").getextrema()
    if alpha_lo == 255:
        return img.convert("RGB")
    out = Image.new("RGB", img.size, (255, 255, 255))
    out.paste(img, mask=img.getchannel("A"))
    return out


def _numbers(x: str | None, y: str | None, what: str) -> tuple[float, float] | str | None:
    """Parse an (x, y) pair of property strings (y defaults to x); a string says what failed."""
    if x is None and y is None:
        return None
    x = y if x is None else x
    y = x if y is None else y
    try:
        return (float(x), float(y))
    except ValueError:
        return f"{what} {x!r} is not a number"


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide.

    Args:
        path: The slide file.
        input_mpp: µm per level-0 pixel filling in missing or unusable metadata.
        force_mpp: µm per level-0 pixel replacing the metadata.

    Raises:
        openslide.OpenSlideError: Straight from OpenSlide; :func:`open_slide` maps it.
    """

    def __init__(self, path: Path, *, input_mpp: float | None = None, force_mpp: float | None = None) -> None:
        super().__init__(path, input_mpp=input_mpp, force_mpp=force_mpp)
        self._osr = openslide.OpenSlide(str(path))

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._osr.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @cached_property
    def properties(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._osr.properties.items()}

    @cached_property
    def associated_images(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        try:
            for name, img in self._osr.associated_images.items():
                out[name] = composite_on_white(np.asarray(img.convert("RGBA")))
        except openslide.OpenSlideError as err:
            raise CorruptSlideError(
                self.path, "cannot decode associated image", detail=f"OpenSlide: {err}"
            ) from err
        return out

    def _metadata_mpp(self) -> tuple[float, float] | str | None:
        # OpenSlide's precedence: the vendor's mpp (openslide.mpp-x), then the TIFF resolution tags.
        # OpenSlide drops a vendor value it cannot parse, so aperio.MPP is read to say what was there.
        props = self._osr.properties
        mpp_x, mpp_y = props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
        if mpp_x is not None or mpp_y is not None:
            return _numbers(mpp_x, mpp_y, "metadata mpp")
        if "aperio.MPP" in props:
            return _numbers(props["aperio.MPP"], props["aperio.MPP"], "metadata mpp (aperio.MPP)")
        unit_name = props.get("tiff.ResolutionUnit", "")
        unit = _UNIT_TO_UM.get(unit_name)
        res_x, res_y = props.get("tiff.XResolution"), props.get("tiff.YResolution")
        if unit is None or res_x is None or res_y is None:
            return None
        res = _numbers(res_x, res_y, "TIFF resolution")
        if isinstance(res, str):
            return res
        if not all(math.isfinite(r) and r > 0 for r in res):
            return f"TIFF resolution {res_x} x {res_y} pixels per {unit_name} is not a positive number"
        return (unit / res[0], unit / res[1])

    def _objective_power(self) -> float | None:
        value = _numbers(self._osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER), None, "")
        return value[0] if isinstance(value, tuple) else None

    def _read_image(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        try:
            img = self._osr.read_region(l0_xy, level, size)
        except openslide.OpenSlideError as err:
            raise CorruptSlideError(
                self.path, f"cannot decode region at l0_xy={l0_xy}, level={level}", detail=f"OpenSlide: {err}"
            ) from err
        return _rgba_to_rgb_image(img)

    def _block_tile_size(self, level: int) -> tuple[int, int] | None:
        # OpenSlide states the stored tile size of TIFF-based formats; without it (MRXS, DICOM, ...)
        # nothing says which block a read decodes, so tiles are read alone.
        props = self._osr.properties
        try:
            size = (
                int(props[f"openslide.level[{level}].tile-width"]),
                int(props[f"openslide.level[{level}].tile-height"]),
            )
        except (KeyError, ValueError):
            return None
        return size if min(size) > 0 else None

    def close(self) -> None:
        self._osr.close()

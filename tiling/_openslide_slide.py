"""Whole-slide images through OpenSlide (every format OpenSlide 4 opens: SVS, NDPI, MRXS, SCN,
generic tiled TIFF, DICOM, ...)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from ._base import Slide, plausible_mpp
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


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide.

    Args:
        path: The slide file.
        input_mpp: µm per level-0 pixel overriding (or filling in) the metadata.

    Raises:
        openslide.OpenSlideError: Straight from OpenSlide; :func:`open_slide` maps it.
    """

    def __init__(self, path: Path, *, input_mpp: float | None = None) -> None:
        super().__init__(path, input_mpp=input_mpp)
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

    def _metadata_mpp(self) -> tuple[float, float] | None:
        props = self._osr.properties
        try:
            mpp = (float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y]))
        except (KeyError, ValueError):
            mpp = None
            unit = _UNIT_TO_UM.get(props.get("tiff.ResolutionUnit", ""))
            try:
                if unit is not None:
                    mpp = (unit / float(props["tiff.XResolution"]), unit / float(props["tiff.YResolution"]))
            except (KeyError, ValueError, ZeroDivisionError):
                mpp = None
        if mpp is None or plausible_mpp(mpp[0]) is None or plausible_mpp(mpp[1]) is None:
            return None
        return mpp

    def _read_image(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        try:
            img = self._osr.read_region(l0_xy, level, size)
        except openslide.OpenSlideError as err:
            raise CorruptSlideError(
                self.path, f"cannot decode region at l0_xy={l0_xy}, level={level}", detail=f"OpenSlide: {err}"
            ) from err
        return _rgba_to_rgb_image(img)

    def close(self) -> None:
        self._osr.close()

"""Conversion of decoded pixel arrays to RGB uint8 on a white background.

Policy (decided per case, documented once here; only truly unusable inputs are refused):

- RGBA / LA: composited on white (transparent pixels become white, as in OpenSlide's empty areas).
- Grayscale (H, W) or (H, W, 1): repeated to three channels.
- 16-bit unsigned: scaled to 8 bit over the range the data uses (``v * 255 / top``, rounded): the
  type's (65535) unless the reader knows fewer bits per sample (``top=4095`` for 12-bit TIFF data).
- Other integer types: scaled over the type's range; negative values clip to black.
- Float: values in [0, 1] are scaled by 255, anything larger is taken as 0..255; NaN becomes white.
- Bool: False black, True white.
- Palette (PIL mode ``P``) and CMYK/YCbCr/LAB are converted by PIL (or, for TIFF, by the
  photometric interpretation in :mod:`._image_slide`) before reaching here.
- Refused (:class:`~equislide.tiling.UnsupportedImageError`): complex values, more than 4 channels,
  anything that is not 2-D or 3-D, empty arrays.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["UnsupportedPixels", "composite_on_white", "pil_to_rgb8", "to_rgb8"]


class UnsupportedPixels(ValueError):
    """Raised by :func:`to_rgb8` for arrays that cannot become RGB; readers map it to a SlideError."""


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite a straight (not premultiplied) alpha (H, W, 4) uint8 array on white.

    Args:
        rgba: (H, W, 4) uint8, alpha in the last channel.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    alpha = rgba[..., 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    out = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _to_uint8(arr: np.ndarray, top: float | None = None) -> np.ndarray:
    """Scale any real dtype to uint8 following the module policy (``top``: the integer value that
    becomes 255, when the data uses less than its type's range)."""
    if arr.dtype == np.uint8 and (top is None or top == 255):
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise UnsupportedPixels(f"complex pixel type {arr.dtype} has no RGB meaning")
    if np.issubdtype(arr.dtype, np.floating):
        data = np.nan_to_num(arr.astype(np.float32), nan=255.0, posinf=255.0, neginf=0.0)
        finite_max = float(data.max(initial=0.0))
        if finite_max <= 1.0:
            data = data * 255.0
        return np.clip(np.rint(data), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        top = float(np.iinfo(arr.dtype).max) if top is None else float(top)
        data = np.clip(arr.astype(np.float32), 0, top)
        return np.rint(data * (255.0 / top)).astype(np.uint8)
    raise UnsupportedPixels(f"pixel type {arr.dtype} is not numeric")


def to_rgb8(arr: np.ndarray, *, top: float | None = None) -> np.ndarray:
    """Turn a decoded (H, W), (H, W, C) array into (H, W, 3) uint8 RGB on white.

    Args:
        arr: Pixels in (row, col[, channel]) order; C in 1..4 (gray, gray+alpha, RGB, RGBA).
        top: For integer pixels, the value that becomes 255 (e.g. 4095 for 12-bit data in uint16);
            default the type's maximum.

    Returns:
        A C-contiguous (H, W, 3) uint8 array.

    Raises:
        UnsupportedPixels: For shapes or types listed as refused in the module docstring.
    """
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise UnsupportedPixels(f"array of shape {arr.shape} is not an image (want (H, W) or (H, W, C))")
    if arr.size == 0:
        raise UnsupportedPixels(f"image of shape {arr.shape} has no pixels")
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    if channels > 4:
        raise UnsupportedPixels(f"{channels} channels (want gray, gray+alpha, RGB or RGBA)")
    data = _to_uint8(arr, top)
    if channels == 1:
        return np.ascontiguousarray(np.repeat(data[..., None], 3, axis=-1))
    if channels == 2:
        return composite_on_white(np.stack([data[..., 0]] * 3 + [data[..., 1]], axis=-1))
    if channels == 4:
        return composite_on_white(data)
    return np.ascontiguousarray(data)


def pil_to_rgb8(img: Image.Image) -> np.ndarray:
    """Decode a PIL image to (H, W, 3) uint8 RGB on white, following the module policy.

    Palette images keep their transparency (converted through RGBA); 16-bit and 32-bit modes go
    through :func:`to_rgb8` so they are scaled, not clipped as PIL's ``convert("RGB")`` would.
    """
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        img = img.convert("RGB")
    elif mode.startswith("I;16"):
        return to_rgb8(np.asarray(img).astype(np.uint16))
    elif mode == "I":
        arr = np.asarray(img)
        # PIL stores 16-bit PNGs as mode "I"; scale by 16 bit when the values fit.
        if arr.min(initial=0) >= 0 and arr.max(initial=0) <= 65535:
            arr = arr.astype(np.uint16)
        return to_rgb8(arr)
    elif mode == "F":
        return to_rgb8(np.asarray(img))
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode == "La":
        img = img.convert("LA")
    return to_rgb8(np.asarray(img))

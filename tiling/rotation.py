"""Rotation of input images and label maps about the image centre, keeping the size.

Convention: positive ``degrees`` rotate counter-clockwise as displayed (row 0 at the top), the
same as ``numpy.rot90(img, k)`` for ``degrees == 90 * k``. The centre is the middle of the pixel
grid, ((W - 1) / 2, (H - 1) / 2) in (x, y) pixels. Multiples of 90 degrees on square images use
``numpy.rot90`` and are exact; other angles interpolate (bilinear for images, nearest for labels)
and fill what comes from outside the frame.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.transform import rotate as _sk_rotate

__all__ = ["rotate_image", "rotate_labels", "unrotate_labels"]


def _quarter_turns(degrees: float, shape: tuple[int, ...]) -> int | None:
    """k for an exact np.rot90, or None when interpolation is needed."""
    k = degrees / 90.0
    if shape[0] == shape[1] and abs(k - round(k)) < 1e-9:
        return int(round(k)) % 4
    return None


def _check_finite(degrees: float) -> float:
    if not math.isfinite(degrees):
        raise ValueError(f"degrees={degrees!r} must be finite")
    return float(degrees)


def rotate_image(img: np.ndarray, degrees: float, *, fill: int = 255) -> np.ndarray:
    """Rotate an (H, W, C) or (H, W) uint8 image counter-clockwise about its centre, same size.

    Args:
        img: (H, W[, C]) uint8 pixels in (row, col) order.
        degrees: Counter-clockwise angle as displayed.
        fill: Value for pixels that come from outside the frame (255: white glass).

    Returns:
        Array of the same shape and dtype; bilinear interpolation off multiples of 90 degrees.
    """
    degrees = _check_finite(degrees)
    if img.ndim not in (2, 3):
        raise ValueError(f"img of shape {img.shape} must be (H, W) or (H, W, C)")
    k = _quarter_turns(degrees, img.shape)
    if k is not None:
        return np.ascontiguousarray(np.rot90(img, k))
    out = _sk_rotate(
        img, degrees, resize=False, order=1, mode="constant", cval=float(fill), preserve_range=True
    )
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(img.dtype)


def rotate_labels(labels: np.ndarray, degrees: float, *, fill: int = -1) -> np.ndarray:
    """Rotate an (H, W) integer label map counter-clockwise with nearest neighbour, same size.

    Args:
        labels: (H, W) integer labels in (row, col) order.
        degrees: Counter-clockwise angle as displayed.
        fill: Label for pixels that come from outside the frame (must fit the dtype).

    Returns:
        (H, W) labels of the same dtype.
    """
    return _rotate_nearest(labels, _check_finite(degrees), fill)[0]


def unrotate_labels(labels: np.ndarray, degrees: float, *, fill: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`rotate_image` by ``degrees`` on a label map computed from the rotated image.

    Rotates by ``-degrees`` with nearest neighbour, so labels of the rotated input land back on the
    pixels of the original image.

    Args:
        labels: (H, W) integer labels of the rotated image.
        degrees: The angle the image was rotated by (counter-clockwise).
        fill: Label for pixels with no source inside the rotated frame.

    Returns:
        ``(labels_back, valid)``: the (H, W) labels in the original image's pixel plane and an
        (H, W) bool mask, True where the pixel came from inside the rotated frame (compare only
        these). For multiples of 90 degrees on a square map ``valid`` is all True.
    """
    return _rotate_nearest(labels, -_check_finite(degrees), fill)


def _rotate_nearest(labels: np.ndarray, degrees: float, fill: int) -> tuple[np.ndarray, np.ndarray]:
    if labels.ndim != 2:
        raise ValueError(f"labels of shape {labels.shape} must be (H, W)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels of dtype {labels.dtype} must be integer")
    info = np.iinfo(labels.dtype)
    if not info.min <= fill <= info.max:
        raise ValueError(f"fill={fill} does not fit labels of dtype {labels.dtype}")
    k = _quarter_turns(degrees, labels.shape)
    if k is not None:
        return np.ascontiguousarray(np.rot90(labels, k)), np.ones(labels.shape, dtype=bool)
    valid = _sk_rotate(
        np.ones(labels.shape, dtype=np.uint8),
        degrees,
        resize=False,
        order=0,
        mode="constant",
        cval=0,
        preserve_range=True,
    ).astype(bool)
    out = _sk_rotate(
        labels.astype(np.float64),
        degrees,
        resize=False,
        order=0,
        mode="constant",
        cval=0,
        preserve_range=True,
    )
    out = np.rint(out).astype(labels.dtype)
    out[~valid] = fill
    return out, valid

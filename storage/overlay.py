"""Overlay PNG: the tissue thumbnail with the clusters alpha-blended in colour, and a legend.

Colours come from :data:`~equislide.storage.labels.PALETTE` (the same as in the GeoJSON and the OME-Zarr
label colours); label 0 (no tissue) is left unpainted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from equislide.files import atomic_path
from equislide.storage.labels import NO_TISSUE, label_color

__all__ = ["render_overlay", "thumbnail_data_uri", "write_overlay_png"]

_SWATCH = 14
_PAD = 6


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    alpha: float = 0.45,
    legend: bool = True,
    names: Mapping[int, str] | None = None,
    title: str | None = None,
):
    """Blend the label colours over ``image`` and add a legend strip on the right.

    Args:
        image: uint8 ``(H, W, 3)`` RGB thumbnail of the sample.
        labels: ``(h, w)`` label map over the same area (any resolution: resized with nearest).
        alpha: Opacity of the cluster colours (0-1).
        legend: Add a legend (swatch + name per label value present).
        names: ``{label value: text}``; default ``"cluster {value}"``.
        title: Optional first legend line (e.g. the sample ID).

    Returns:
        A ``PIL.Image.Image`` (RGB).
    """
    from PIL import Image, ImageDraw, ImageFont

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer) or 0 in labels.shape:
        raise ValueError(f"labels must be a non-empty 2-D integer map, got {labels.dtype} {labels.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be within [0, 1]")
    h, w = image.shape[:2]
    rows = (np.arange(h) * labels.shape[0]) // h
    cols = (np.arange(w) * labels.shape[1]) // w
    big = labels[rows][:, cols]
    values = [int(v) for v in np.unique(labels) if v != NO_TISSUE and v > 0]
    lut = np.zeros((int(labels.max()) + 1 if labels.size else 1, 3), np.float32)
    for v in values:
        lut[v] = label_color(v)
    painted = big > 0
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * lut[big[painted]]
    blended = Image.fromarray(np.rint(out).astype(np.uint8), "RGB")
    if not legend:
        return blended
    font = ImageFont.load_default()
    lines = [(None, title)] if title else []
    lines += [(v, (names or {}).get(v, f"cluster {v}")) for v in values]
    probe = ImageDraw.Draw(blended)
    text_w = max((int(probe.textlength(t, font=font)) for _, t in lines), default=0)
    width = _PAD * 3 + _SWATCH + text_w
    height = max(h, _PAD + len(lines) * (_SWATCH + _PAD))
    canvas = Image.new("RGB", (w + width, height), (255, 255, 255))
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = _PAD
    for v, text in lines:
        x = w + _PAD
        if v is not None:
            draw.rectangle([x, y, x + _SWATCH - 1, y + _SWATCH - 1], fill=label_color(v), outline=(0, 0, 0))
        draw.text((x + _SWATCH + _PAD, y + 1), text, fill=(0, 0, 0), font=font)
        y += _SWATCH + _PAD
    return canvas


def write_overlay_png(path: str | Path, image: np.ndarray, labels: np.ndarray, **kwargs) -> Path:
    """:func:`render_overlay` and save it as PNG atomically (temporary file + ``os.replace``)."""
    picture = render_overlay(image, labels, **kwargs)
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def thumbnail_data_uri(path: str | Path, *, max_side: int = 160, quality: int = 80) -> str:
    """A small JPEG of an image file as a ``data:`` URI, for markdown that must carry its own pictures
    (a Prefect markdown artifact renders ``![](data:image/jpeg;base64,...)``; ~5-10 kB at 160 px)."""
    import base64
    import io

    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

"""Overlay PNG: the sample's image with the clusters alpha-blended in colour, a legend and a scale bar.

Colours come from :data:`~equislide.storage.labels.PALETTE` (the same as in the GeoJSON and the OME-Zarr
label colours); label 0 (no tissue) is left unpainted, so the image shows through where there are no
labels (e.g. a whole slide's edges past the tile grid). The legend and the scale bar are sized from
the picture's longest side (:data:`LEGEND_FRACTION`), so they stay readable when the PNG is shown as a
160 px thumbnail (the Prefect summary). Text is set in matplotlib's DejaVu Sans (it has "µ").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from equislide.files import atomic_path
from equislide.storage.labels import NO_TISSUE, label_color

__all__ = ["LEGEND_FRACTION", "render_overlay", "scale_bar_length", "thumbnail_data_uri", "write_overlay_png"]

#: Legend text and swatches are this fraction of the finished picture's longest side: 10 px in a
#: 160 px thumbnail.
LEGEND_FRACTION = 1 / 16
_MIN_FONT = 11


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):  # matplotlib's font missing: Pillow's own (it lacks "µ")
        return ImageFont.load_default(size=size)


def scale_bar_length(width_um: float, *, fraction: float = 1 / 3) -> tuple[float, str]:
    """The longest round length (1, 2 or 5 x 10^k µm) up to ``fraction`` of ``width_um``, and its label
    (``"200 µm"``, ``"1 mm"``)."""
    if not (math.isfinite(width_um) and width_um > 0):
        raise ValueError(f"width_um={width_um!r} must be a positive number of µm")
    top = width_um * fraction
    exp = math.floor(math.log10(top))
    length = max(m * 10.0**exp for m in (1, 2, 5) if m * 10.0**exp <= top * (1 + 1e-9))
    return length, (f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} µm")


def _label_grid(
    shape: tuple[int, int], labels: np.ndarray, origin: tuple[float, float], scale: float | None
) -> np.ndarray:
    """The label under each image pixel's centre (nearest); NO_TISSUE outside the label map."""
    h, w = shape
    if scale is None:  # stretched over the whole image
        return labels[(np.arange(h) * labels.shape[0]) // h][:, (np.arange(w) * labels.shape[1]) // w]
    if not scale > 0:
        raise ValueError(f"label_scale={scale!r} must be > 0")
    rows = np.floor((np.arange(h) + 0.5 - origin[1]) / scale).astype(np.int64)
    cols = np.floor((np.arange(w) + 0.5 - origin[0]) / scale).astype(np.int64)
    ok = ((rows >= 0) & (rows < labels.shape[0]))[:, None] & ((cols >= 0) & (cols < labels.shape[1]))[None]
    rows, cols = np.clip(rows, 0, labels.shape[0] - 1), np.clip(cols, 0, labels.shape[1] - 1)
    if isinstance(labels, np.ndarray):
        big = labels[rows][:, cols]
    else:  # a lazy (zarr) map: read only the rows under each band of picture rows
        big = np.empty((h, w), labels.dtype)
        band = max(1, int(labels.chunks[0]))
        for y0 in range(0, h, band):
            part = rows[y0 : y0 + band]
            lo, hi = int(part.min()), int(part.max()) + 1
            big[y0 : y0 + band] = np.asarray(labels[lo:hi])[part - lo][:, cols]
    return np.where(ok, big, NO_TISSUE)


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    alpha: float = 0.45,
    legend: bool = True,
    names: Mapping[int, str] | None = None,
    title: str | None = None,
    label_origin: tuple[float, float] = (0.0, 0.0),
    label_scale: float | None = None,
    pixel_size_um: float | None = None,
    label_values: list[int] | None = None,
):
    """Blend the label colours over ``image``; add a legend, a title and a scale bar.

    Args:
        image: uint8 ``(H, W, 3)`` RGB picture of the sample.
        labels: ``(h, w)`` label map.
        alpha: Opacity of the cluster colours (0-1).
        legend: Add a legend (swatch + name per label value present), the title and the scale bar.
        names: ``{label value: text}``; default ``"cluster {value}"``.
        title: Optional heading above the picture (e.g. the sample ID).
        label_origin: ``(x, y)`` image px of the label map's top-left corner (may be negative).
        label_scale: Image px per label px; None: the label map is stretched over the whole image
            (nearest).
        pixel_size_um: µm per image px; draws a scale bar of a round length (none when None).
        label_values: The values present in ``labels``; required (for the legend) when ``labels`` is a
            lazy zarr array (a whole slide's map), which is then read only where the picture samples it.

    Returns:
        A ``PIL.Image.Image`` (RGB). The legend goes right of a portrait picture and below a landscape
        one, whichever keeps the longest side shorter.
    """
    from PIL import Image, ImageDraw

    image = np.asarray(image)
    lazy = not isinstance(labels, np.ndarray) and hasattr(labels, "chunks")
    if lazy and label_values is None:
        raise ValueError("labels is a lazy array: label_values must list its values")
    if not lazy:
        labels = np.asarray(labels)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if len(labels.shape) != 2 or not np.issubdtype(labels.dtype, np.integer) or 0 in labels.shape:
        raise ValueError(f"labels must be a non-empty 2-D integer map, got {labels.dtype} {labels.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be within [0, 1]")
    if pixel_size_um is not None and not float(pixel_size_um) > 0:
        raise ValueError(f"pixel_size_um={pixel_size_um!r} must be > 0")
    h, w = image.shape[:2]
    big = _label_grid((h, w), labels, label_origin, label_scale)
    present = [int(v) for v in (label_values if lazy else np.unique(labels))]
    values = [v for v in present if v != NO_TISSUE and v > 0]
    lut = np.zeros((max(present, default=0) + 1, 3), np.float32)
    for v in values:
        lut[v] = label_color(v)
    painted = big > 0
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * lut[big[painted]]
    blended = Image.fromarray(np.rint(out).astype(np.uint8), "RGB")
    if not legend:
        return blended
    items = [(v, (names or {}).get(v, f"cluster {v}")) for v in values]
    size = max(_MIN_FONT, math.ceil(max(h, w) * LEGEND_FRACTION))
    for _ in range(6):  # the legend widens the picture, which enlarges the text: settle on a size
        layout = _legend_layout(w, h, items, title, size)
        longest = max(layout["canvas"])
        want = max(_MIN_FONT, math.ceil(longest * LEGEND_FRACTION))
        if want <= size:
            break
        size = want
    font = _font(size)
    canvas = Image.new("RGB", layout["canvas"], (255, 255, 255))
    canvas.paste(blended, layout["image_xy"])
    draw = ImageDraw.Draw(canvas)
    if layout["title"]:
        draw.text((layout["pad"], layout["pad"] // 2), layout["title"], fill=(0, 0, 0), font=font)
    for (v, text), (x, y) in zip(items, layout["items"], strict=True):
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=label_color(v), outline=(0, 0, 0))
        draw.text(
            (x + size + layout["pad"] // 2, y + size // 2), text, fill=(0, 0, 0), font=font, anchor="lm"
        )
    if pixel_size_um is not None:
        bar_size = max(_MIN_FONT, round(size * 0.8))  # smaller than the legend: it sits on the tissue
        _draw_scale_bar(canvas, layout["image_xy"], (w, h), float(pixel_size_um), bar_size, _font(bar_size))
    return canvas


def _text_width(text: str, size: int) -> int:
    return int(math.ceil(_font(size).getlength(text)))


def _legend_layout(w: int, h: int, items, title: str | None, size: int) -> dict:
    """Canvas size and positions for a legend right of the image or below it, whichever is smaller."""
    pad = max(4, size // 2)
    head = size + pad if title else 0
    widths = [size + pad // 2 + _text_width(t, size) + pad for _, t in items]
    # Right: one item per line.
    right_w = pad + max(widths, default=0)
    right = {
        "canvas": (w + right_w, head + max(h, pad + len(items) * (size + pad))),
        "image_xy": (0, head),
        "items": [(w + pad, head + pad + i * (size + pad)) for i in range(len(items))],
    }
    # Below: items flow left to right and wrap at the image's width.
    spots, x, y = [], pad, head + h + pad
    for iw in widths:
        if x > pad and x + iw > max(w, iw + pad):
            x, y = pad, y + size + pad
        spots.append((x, y))
        x += iw
    below = {
        "canvas": (max(w, max(widths, default=0) + 2 * pad), y + (size + pad if items else 0)),
        "image_xy": (0, head),
        "items": spots,
    }
    best = min((right, below), key=lambda lay: (max(lay["canvas"]), lay["canvas"][0] * lay["canvas"][1]))
    # A long title (sample IDs run to 180 bytes) is cut to the picture's width, not the picture widened
    # to it: a wider picture means larger text, which fed back into a font too large for FreeType.
    best["title"] = _fit_text(title, size, best["canvas"][0] - 2 * pad) if title else None
    best["pad"] = pad
    return best


def _fit_text(text: str, size: int, width: int) -> str:
    """``text``, or its longest head that fits in ``width`` px with an ellipsis."""
    if _text_width(text, size) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_width(text[:mid] + "…", size) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def _draw_scale_bar(canvas, xy: tuple[int, int], wh: tuple[int, int], px_um: float, size: int, font) -> None:
    from PIL import Image, ImageDraw

    w, h = wh
    length_um, text = scale_bar_length(w * px_um)
    bar = max(1, round(length_um / px_um))
    thick = max(2, size // 4)
    pad = max(3, size // 3)
    text_w = int(math.ceil(font.getlength(text)))
    box_w, box_h = max(bar, text_w) + 2 * pad, size + thick + 3 * pad
    if box_w > w or box_h > h:
        return  # too small a picture to carry a readable bar
    x0, y0 = xy[0] + pad, xy[1] + h - pad - box_h
    veil = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    ImageDraw.Draw(veil).rectangle([x0, y0, x0 + box_w - 1, y0 + box_h - 1], fill=(255, 255, 255, 200))
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), veil).convert("RGB"))
    draw = ImageDraw.Draw(canvas)
    draw.text((x0 + pad, y0 + pad), text, fill=(0, 0, 0), font=font)
    by = y0 + box_h - pad - thick
    draw.rectangle([x0 + pad, by, x0 + pad + bar - 1, by + thick - 1], fill=(0, 0, 0))


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

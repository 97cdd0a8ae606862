"""Plain single-resolution images (PNG, JPEG, TIFF, BMP, ...) such as single TMA core images.

TIFF is decoded with tifffile (any bit depth, compression via imagecodecs, resolution tags); other
formats with PIL. The whole image is decoded at open, so truncation is found at once, and is held in
memory as one (H, W, 3) uint8 array behind a single pyramid level.
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from ._base import Slide, plausible_mpp
from ._errors import (
    CorruptSlideError,
    NotASlideError,
    SlideError,
    SlideTooLargeError,
    UnsupportedImageError,
)
from ._rgb import UnsupportedPixels, pil_to_rgb8, to_rgb8

__all__ = ["MAX_PLAIN_PIXELS", "ImageSlide", "sniff_format"]

#: Plain images declaring more pixels than this are refused before decoding (decompression bombs).
#: PIL-decoded formats are further bounded by PIL's own bomb limit (``2 * Image.MAX_IMAGE_PIXELS``).
MAX_PLAIN_PIXELS = 2**31

_MAGIC = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
)
_UNIT_TO_UM = {2: 25400.0, 3: 1e4}  # TIFF ResolutionUnit: 2 inch, 3 centimetre


def sniff_format(head: bytes) -> str | None:
    """Name the image format from a file's first 16 bytes, or ``None`` when unknown."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


class ImageSlide(Slide):
    """A plain image presented as a one-level slide.

    Args:
        path: The image file.
        input_mpp: µm per pixel overriding (or filling in) the metadata (TIFF resolution tags, PNG
            pHYs / JPEG density; resolutions coarser than 50 µm/px such as 72 dpi are ignored).
        max_pixels: Refuse images declaring more pixels than this.

    Raises:
        NotASlideError: Unknown format.
        CorruptSlideError: A known format that fails to decode (truncated, broken).
        SlideTooLargeError: Declared width x height above ``max_pixels`` (or PIL's bomb limit).
        UnsupportedImageError: Pixels that cannot become RGB (e.g. 5 channels).
    """

    def __init__(
        self, path: Path, *, input_mpp: float | None = None, max_pixels: int = MAX_PLAIN_PIXELS
    ) -> None:
        super().__init__(path, input_mpp=input_mpp)
        with open(path, "rb") as fh:
            self._format = sniff_format(fh.read(16))
        self._max_pixels = max_pixels
        self._props: dict[str, str] = {}
        self._mpp_meta: tuple[float, float] | None = None
        self._rgb = self._decode_tiff_or_pil() if self._format == "TIFF" else self._decode_pil()
        self._props["equislide.reader"] = "tifffile" if self._format == "TIFF" else "PIL"
        self._props["equislide.format"] = self._format or "unknown"

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self._max_pixels:
            raise SlideTooLargeError(
                self.path,
                f"declares {width}x{height} pixels, above the limit of {self._max_pixels}",
                detail="refused before decoding (possible decompression bomb)",
            )

    def _decode_tiff_or_pil(self) -> np.ndarray:
        """tifffile first; PIL for the odd TIFF tifffile cannot decode (e.g. old-style JPEG)."""
        try:
            return self._decode_tiff()
        except CorruptSlideError as tiff_err:
            if tiff_err.reason.startswith("truncated TIFF"):
                raise
            try:
                self._props.clear()
                return self._decode_pil()
            except SlideError:
                raise tiff_err from None

    def _decode_tiff(self) -> np.ndarray:
        tiff_log = logging.getLogger("tifffile")
        tiff_log_level = tiff_log.level
        tiff_log.setLevel(logging.CRITICAL)  # tifffile logs each bad offset; the error says it once
        try:
            with tifffile.TiffFile(self.path) as tif:
                if not tif.pages or not tif.series:
                    raise CorruptSlideError(self.path, "truncated or corrupt TIFF", detail="no readable page")
                series = tif.series[0]
                page = tif.pages.first
                truncation = _tiff_truncation(tif)
                if truncation:
                    raise CorruptSlideError(self.path, "truncated TIFF", detail=truncation)
                axes, shape = series.axes, series.shape
                if "Y" not in axes or "X" not in axes:
                    raise UnsupportedImageError(self.path, f"TIFF without image axes (axes {axes!r})")
                self._check_pixels(shape[axes.index("X")], shape[axes.index("Y")])
                self._props.update(
                    {
                        "tiff.axes": axes,
                        "tiff.shape": "x".join(map(str, shape)),
                        "tiff.dtype": str(series.dtype),
                        "tiff.photometric": str(page.photometric.name),
                    }
                )
                self._mpp_meta = _tiff_mpp(page)
                arr = series.asarray()
                if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                    arr, axes = _apply_colormap(arr, page.colormap), axes + "S"
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError, RuntimeError) as err:
            reason = "truncated or corrupt TIFF"
            raise CorruptSlideError(self.path, reason, detail=f"tifffile: {err}") from err
        except Exception as err:  # imagecodecs raises its own classes (e.g. Jpeg8Error) per codec
            if type(err).__module__.startswith("imagecodecs"):
                raise CorruptSlideError(self.path, "truncated or corrupt TIFF", detail=f"{err}") from err
            raise
        finally:
            tiff_log.setLevel(tiff_log_level)
        arr = _to_yxs(arr, axes)
        try:
            return to_rgb8(arr)
        except UnsupportedPixels as err:
            raise UnsupportedImageError(self.path, str(err)) from err

    def _decode_pil(self) -> np.ndarray:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": the error says it
                img = Image.open(self.path)
        except Image.DecompressionBombError as err:
            reason = "image too large (decompression bomb)"
            raise SlideTooLargeError(self.path, reason, detail=f"PIL: {err}") from err
        except UnidentifiedImageError as err:
            if self._format is None:
                raise NotASlideError(self.path, "not a slide or image (unknown format)") from err
            raise CorruptSlideError(
                self.path, f"truncated or corrupt {self._format}", detail=f"PIL: {err}"
            ) from err
        with img:
            self._check_pixels(*img.size)
            self._props.update({"pil.format": str(img.format), "pil.mode": img.mode})
            dpi = img.info.get("dpi")
            if dpi:
                try:
                    mpp = (25400.0 / float(dpi[0]), 25400.0 / float(dpi[1]))
                    if plausible_mpp(mpp[0]) and plausible_mpp(mpp[1]):
                        self._mpp_meta = mpp
                except (TypeError, ValueError, ZeroDivisionError, IndexError):
                    pass
            try:
                img.load()
                rgb = pil_to_rgb8(img)
            except UnsupportedPixels as err:
                raise UnsupportedImageError(self.path, str(err)) from err
            except (OSError, ValueError, SyntaxError) as err:
                raise CorruptSlideError(
                    self.path, f"truncated or corrupt {img.format or self._format}", detail=f"PIL: {err}"
                ) from err
        return rgb

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return ((self._rgb.shape[1], self._rgb.shape[0]),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        return {}

    def _metadata_mpp(self) -> tuple[float, float] | None:
        return self._mpp_meta

    def _read_image(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        (x, y), (w, h) = l0_xy, size
        img_h, img_w = self._rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img_w), min(y + h, img_h)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return Image.fromarray(self._rgb[y : y + h, x : x + w])
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgb[y0:y1, x0:x1]
        return Image.fromarray(out)

    def _reopen_kwargs(self) -> dict[str, object]:
        return {"input_mpp": self._input_mpp, "max_pixels": self._max_pixels}

    def close(self) -> None:
        """Nothing to release: the pixels were decoded at open and stay until garbage collection."""


def _apply_colormap(indices: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """Palette TIFF: (3, N) colormap (16 bit per the spec, 8 bit from some writers) to RGB uint8."""
    cmap = np.asarray(colormap)
    if cmap.max(initial=0) > 255:
        cmap = np.rint(cmap / 257.0)
    lut = cmap.T.astype(np.uint8)
    return lut[np.clip(indices, 0, len(lut) - 1)]


def _tiff_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """(x, y) µm per pixel from XResolution/YResolution and ResolutionUnit (inch or cm)."""
    tags = page.tags
    unit_tag, x_tag, y_tag = tags.get("ResolutionUnit"), tags.get("XResolution"), tags.get("YResolution")
    if unit_tag is None or x_tag is None or y_tag is None:
        return None
    unit = _UNIT_TO_UM.get(int(unit_tag.value))
    try:
        x_res = x_tag.value[0] / x_tag.value[1]
        y_res = y_tag.value[0] / y_tag.value[1]
        mpp = (unit / x_res, unit / y_res) if unit is not None else None
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    if mpp is None or plausible_mpp(mpp[0]) is None or plausible_mpp(mpp[1]) is None:
        return None
    return mpp


def _tiff_truncation(tif: tifffile.TiffFile) -> str | None:
    """Say how a TIFF is cut short (an IFD or image data past the end of file), or ``None``.

    tifffile tolerates an IFD chain that points past the end (it logs and stops), so a truncated
    multi-image file such as an SVS would otherwise open with only its first images.
    """
    fh = tif.filehandle
    size = fh.size
    big = tif.is_bigtiff
    order = tif.byteorder
    count_fmt, offset_fmt = order + ("Q" if big else "H"), order + ("Q" if big else "I")
    entry_size = 20 if big else 12
    fh.seek(8 if big else 4)
    offset = struct.unpack(offset_fmt, fh.read(struct.calcsize(offset_fmt)))[0]
    seen: set[int] = set()
    while offset:
        if offset in seen:
            return f"IFD loop at offset {offset}"
        seen.add(offset)
        if offset + struct.calcsize(count_fmt) > size:
            return f"IFD at offset {offset} past the end of the {size}-byte file"
        fh.seek(offset)
        count = struct.unpack(count_fmt, fh.read(struct.calcsize(count_fmt)))[0]
        next_at = offset + struct.calcsize(count_fmt) + count * entry_size
        if next_at + struct.calcsize(offset_fmt) > size:
            return f"IFD at offset {offset} cut by the end of the {size}-byte file"
        fh.seek(next_at)
        offset = struct.unpack(offset_fmt, fh.read(struct.calcsize(offset_fmt)))[0]
    page = tif.pages.first
    ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
    if ends and max(ends) > size:
        return f"image data ends at byte {max(ends)} of a {size}-byte file"
    return None


def _to_yxs(arr: np.ndarray, axes: str) -> np.ndarray:
    """Reduce a tifffile series to (Y, X) or (Y, X, S): channel-like axes last, others at index 0."""
    keep = [a for a in axes if a in "YXS"]
    if "S" not in axes and "C" in axes and arr.shape[axes.index("C")] <= 4:
        keep.append("C")
    for i in reversed(range(len(axes))):
        if axes[i] not in keep:
            arr = np.take(arr, 0, axis=i)
    remaining = [a for a in axes if a in keep]
    order = [remaining.index(a) for a in "YXSC" if a in remaining]
    return np.moveaxis(arr, order, range(len(order)))

"""Plain single-resolution images (PNG, JPEG, TIFF, BMP, ...) such as single TMA core images.

TIFF is decoded with tifffile (any bit depth, compression via imagecodecs, resolution tags); other
formats with PIL. Images up to :data:`EAGER_PIXELS` are decoded whole at open, so a truncated or
broken one is found at once, and held as one (H, W, 3) uint8 array behind a single pyramid level.
Larger TIFFs are read lazily, region by region through tifffile's zarr view, so memory follows the
region read, not the image: a 30000 x 30000 TIFF never becomes 2.7 GB of RGB.

Pixels become RGB by the TIFF's photometric interpretation and bits per sample (CMYK, CIELAB,
min-is-white, palette, 12-bit data in uint16, ...; see :class:`_TiffPixels`), never by guessing from
the channel count alone.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from ._base import Slide
from ._errors import (
    CorruptSlideError,
    NotASlideError,
    SlideError,
    SlideTooLargeError,
    UnsupportedImageError,
)
from ._rgb import UnsupportedPixels, composite_on_white, pil_to_rgb8, to_rgb8

__all__ = ["EAGER_PIXELS", "MAX_PLAIN_PIXELS", "ImageSlide", "sniff_format"]

#: Plain images declaring more pixels than this are refused before decoding (decompression bombs).
#: PIL-decoded formats are further bounded by PIL's own bomb limit (``2 * Image.MAX_IMAGE_PIXELS``).
MAX_PLAIN_PIXELS = 2**31
#: TIFFs up to this many pixels (48 MB as RGB) are decoded at open; larger ones region by region.
EAGER_PIXELS = 2**24
#: A lazily read TIFF whose single strip or tile decodes to more bytes than this is refused: every
#: region read would decode it whole.
MAX_CHUNK_BYTES = 2**28

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
        input_mpp: µm per pixel filling in missing or unusable metadata (TIFF resolution tags, PNG
            pHYs / JPEG density).
        force_mpp: µm per pixel replacing the metadata.
        max_pixels: Refuse images declaring more pixels than this.

    Raises:
        NotASlideError: Unknown format.
        CorruptSlideError: A known format that fails to decode (truncated, broken).
        SlideTooLargeError: Declared width x height above ``max_pixels`` (or PIL's bomb limit).
        UnsupportedImageError: Pixels that cannot become RGB (e.g. 5 channels, ITU L*a*b*).
    """

    def __init__(
        self,
        path: Path,
        *,
        input_mpp: float | None = None,
        force_mpp: float | None = None,
        max_pixels: int = MAX_PLAIN_PIXELS,
    ) -> None:
        super().__init__(path, input_mpp=input_mpp, force_mpp=force_mpp)
        with open(path, "rb") as fh:
            self._format = sniff_format(fh.read(16))
        self._max_pixels = max_pixels
        self._props: dict[str, str] = {}
        self._mpp_meta: tuple[float, float] | str | None = None
        self._rgb: np.ndarray | None = None
        self._tif: tifffile.TiffFile | None = None
        self._lazy = None  # (zarr array, _TiffPixels) of a TIFF read region by region
        if self._format == "TIFF":
            self._open_tiff_or_pil()
        else:
            self._rgb = self._decode_pil()
        if self._rgb is not None:
            self._size = (self._rgb.shape[1], self._rgb.shape[0])
        self._props["equislide.reader"] = "tifffile" if "tiff.axes" in self._props else "PIL"
        self._props["equislide.format"] = self._format or "unknown"

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self._max_pixels:
            raise SlideTooLargeError(
                self.path,
                f"declares {width}x{height} pixels, above the limit of {self._max_pixels}",
                detail="refused before decoding (possible decompression bomb)",
            )

    def _open_tiff_or_pil(self) -> None:
        """tifffile first; PIL for the odd TIFF tifffile cannot decode (e.g. old-style JPEG)."""
        try:
            self._open_tiff()
        except CorruptSlideError as tiff_err:
            if tiff_err.reason.startswith("truncated TIFF"):
                raise
            try:
                self._props.clear()
                self._rgb = self._decode_pil()
            except SlideError:
                raise tiff_err from None

    def _open_tiff(self) -> None:
        size = self.path.stat().st_size
        if size < 16:
            raise CorruptSlideError(
                self.path, f"truncated TIFF: the {size}-byte file ends inside the TIFF header"
            )
        with _quiet_tifffile(), self._tiff_errors():
            tif = tifffile.TiffFile(self.path)
            try:
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
                width, height = shape[axes.index("X")], shape[axes.index("Y")]
                self._check_pixels(width, height)
                self._props.update(
                    {
                        "tiff.axes": axes,
                        "tiff.shape": "x".join(map(str, shape)),
                        "tiff.dtype": str(series.dtype),
                        "tiff.photometric": str(page.photometric.name),
                        "tiff.bitspersample": str(page.bitspersample),
                    }
                )
                self._mpp_meta = _tiff_mpp(page)
                try:
                    pixels = _TiffPixels(page, axes)
                except UnsupportedPixels as err:
                    raise UnsupportedImageError(self.path, str(err)) from err
                self._size = (int(width), int(height))
                if width * height <= EAGER_PIXELS:
                    raw = _to_yxs(series.asarray(), axes)
                    pixels.fit_range(raw)
                    self._rgb = self._convert(pixels, raw)
                    tif.close()
                    return
                chunk_bytes = math.prod(page.chunks) * np.dtype(page.dtype).itemsize
                if chunk_bytes > MAX_CHUNK_BYTES:
                    kind = "tile" if page.is_tiled else "strip"
                    raise SlideTooLargeError(
                        self.path,
                        f"{width}x{height} px stored in {kind}s of {chunk_bytes // 2**20} MB each, above "
                        f"the limit of {MAX_CHUNK_BYTES // 2**20} MB decoded per read",
                        detail="save it as a tiled TIFF",
                    )
                import zarr

                self._lazy = (zarr.open(series.aszarr(level=0), mode="r"), pixels, axes)
                self._tif = tif
            except BaseException:
                if self._tif is None:
                    tif.close()
                raise

    @contextmanager
    def _tiff_errors(self):
        """Every failure of tifffile or a codec becomes one CorruptSlideError naming the file."""
        try:
            yield
        except SlideError:
            raise
        except (
            tifffile.TiffFileError,
            struct.error,
            ValueError,
            IndexError,
            KeyError,
            OSError,
            RuntimeError,
            EOFError,
            OverflowError,
            MemoryError,
        ) as err:
            raise CorruptSlideError(
                self.path, "truncated or corrupt TIFF", detail=f"tifffile: {type(err).__name__}: {err}"
            ) from err
        except Exception as err:  # imagecodecs raises its own classes (e.g. Jpeg8Error) per codec
            if type(err).__module__.startswith(("imagecodecs", "zarr", "numcodecs")):
                raise CorruptSlideError(self.path, "truncated or corrupt TIFF", detail=f"{err}") from err
            raise

    def _convert(self, pixels: _TiffPixels, raw: np.ndarray) -> np.ndarray:
        try:
            return pixels.to_rgb(raw)
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
        except (OSError, ValueError, SyntaxError, struct.error, EOFError) as err:
            name = self._format or "image"
            raise CorruptSlideError(self.path, f"truncated or corrupt {name}", detail=f"PIL: {err}") from err
        with img:
            self._check_pixels(*img.size)
            self._props.update({"pil.format": str(img.format), "pil.mode": img.mode})
            self._mpp_meta = _pil_mpp(img.info.get("dpi"))
            try:
                img.load()
                rgb = pil_to_rgb8(img)
            except UnsupportedPixels as err:
                raise UnsupportedImageError(self.path, str(err)) from err
            except (OSError, ValueError, SyntaxError, struct.error, EOFError) as err:
                raise CorruptSlideError(
                    self.path, f"truncated or corrupt {img.format or self._format}", detail=f"PIL: {err}"
                ) from err
        return rgb

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return (self._size,)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        return {}

    def _metadata_mpp(self) -> tuple[float, float] | str | None:
        return self._mpp_meta

    def _pixels(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGB of the in-image box [x0, x1) x [y0, y1)."""
        if self._rgb is not None:
            return self._rgb[y0:y1, x0:x1]
        z, pixels, axes = self._lazy
        index = tuple(
            slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a in "SC" else 0
            for a in axes
        )
        with _quiet_tifffile(), self._tiff_errors():
            raw = z[index]
        kept = "".join(a for a in axes if a in "YXSC")
        return self._convert(pixels, _to_yxs(raw, kept))

    def _read_image(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        (x, y), (w, h) = l0_xy, size
        img_w, img_h = self._size
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img_w), min(y + h, img_h)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return Image.fromarray(np.ascontiguousarray(self._pixels(x, y, x + w, y + h)))
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels(x0, y0, x1, y1)
        return Image.fromarray(out)

    def _reopen_kwargs(self) -> dict[str, object]:
        return {**super()._reopen_kwargs(), "max_pixels": self._max_pixels}

    def close(self) -> None:
        """Release a lazily read TIFF; decoded pixels stay until garbage collection."""
        if self._tif is not None:
            self._tif.close()
            self._tif, self._lazy = None, None


@contextmanager
def _quiet_tifffile():
    """tifffile logs each bad offset; the error says it once."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _pil_mpp(dpi) -> tuple[float, float] | str | None:
    """(x, y) µm per pixel from PIL's ``dpi`` (PNG pHYs, JPEG density), unchecked."""
    if not dpi:
        return None
    try:
        x, y = float(dpi[0]), float(dpi[1])
    except (TypeError, ValueError, IndexError):
        return f"metadata resolution {dpi!r} dpi is not a number"
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        return f"metadata resolution {x:g}x{y:g} dpi is not a positive number"
    return (25400.0 / x, 25400.0 / y)


class _TiffPixels:
    """Turns a TIFF page's decoded samples, (Y, X) or (Y, X, S), into RGB uint8 on white.

    By photometric interpretation: min-is-black / min-is-white grey, RGB, palette, CMYK
    (``SEPARATED`` with 4 inks), CIELAB and ICCLAB (through ``skimage.color.lab2rgb``), YCbCr
    (full-range JFIF when not JPEG-compressed: tifffile hands those back undecoded). Refused: ITU
    L*a*b*, CFA, LogL/LogLuv and other interpretations without an RGB rendering.

    Integer samples are scaled by the range they use, not by their container: ``BitsPerSample``
    (12 for 12-bit data tifffile unpacks into uint16), else ``MaxSampleValue``, else, for an image
    decoded whole, the smallest of 8/10/12/14/16 bits that holds its maximum (12-bit camera data
    saved as plain uint16).
    """

    _SUPPORTED = ("MINISBLACK", "MINISWHITE", "RGB", "PALETTE", "SEPARATED", "CIELAB", "ICCLAB", "YCBCR")

    def __init__(self, page: tifffile.TiffPage, axes: str) -> None:
        photometric = page.photometric
        name = photometric.name if hasattr(photometric, "name") else str(photometric)
        if name not in self._SUPPORTED:
            raise UnsupportedPixels(f"{name} photometric interpretation has no RGB conversion here")
        self.photometric = name
        self.colormap = page.colormap if name == "PALETTE" else None
        self.jpeg = page.compression in (6, 7, 33007, 34892)
        self.dtype = np.dtype(page.dtype)
        extras = tuple(int(e) for e in (page.extrasamples or ()))
        self.extras = extras
        if name == "SEPARATED":
            inkset = page.tags.get("InkSet")
            inks = page.samplesperpixel - len(extras)
            if (inkset is not None and int(inkset.value) != 1) or inks != 4:
                raise UnsupportedPixels(f"ink-separated TIFF with {inks} inks, not CMYK")
        self.top: float | None = None
        if self.dtype.kind == "u":
            container = 8 * self.dtype.itemsize
            bits = int(page.bitspersample)
            max_tag = page.tags.get("MaxSampleValue")
            max_value = max_tag.value if max_tag is not None else None
            if isinstance(max_value, tuple):
                max_value = max(max_value)
            if 0 < bits < container:
                self.top = float(2**bits - 1)
            elif max_value is not None and 0 < int(max_value) < 2**container - 1:
                self.top = float(max_value)

    def fit_range(self, raw: np.ndarray) -> None:
        """Take the sample range from the data (the whole image) when the tags do not state it."""
        if self.top is not None or self.dtype.kind != "u" or self.dtype.itemsize == 1:
            return
        if self.photometric not in ("MINISBLACK", "MINISWHITE", "RGB"):
            return
        colour = raw if raw.ndim == 2 else raw[..., : min(3, raw.shape[-1])]
        peak = int(colour.max(initial=0))
        for bits in (8, 10, 12, 14):
            if peak <= 2**bits - 1:
                self.top = float(2**bits - 1)
                return

    def to_rgb(self, raw: np.ndarray) -> np.ndarray:
        if self.photometric == "PALETTE" and self.colormap is not None:
            return _apply_colormap(raw if raw.ndim == 2 else raw[..., 0], self.colormap)
        if raw.ndim == 3 and self.extras and all(e == 0 for e in self.extras):
            raw = raw[..., : raw.shape[-1] - len(self.extras)]  # unspecified extra samples: not alpha
        if self.photometric == "SEPARATED":
            return self._cmyk(raw)
        if self.photometric in ("CIELAB", "ICCLAB"):
            return self._lab(raw)
        if self.photometric == "YCBCR" and not self.jpeg and raw.ndim == 3 and raw.shape[-1] >= 3:
            return self._ycbcr(raw)
        if self.photometric == "MINISWHITE":
            raw = self._invert(raw)
        return to_rgb8(raw, top=self.top)

    def _unit(self, a: np.ndarray) -> np.ndarray:
        """Samples as float32 in [0, 1]."""
        if a.dtype.kind == "f":
            return np.clip(np.nan_to_num(a.astype(np.float32), nan=1.0), 0.0, 1.0)
        top = self.top or float(np.iinfo(a.dtype).max)
        return np.clip(a.astype(np.float32) / top, 0.0, 1.0)

    def _invert(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype == bool:
            return ~raw
        if raw.dtype.kind == "f":
            return 1.0 - self._unit(raw)
        top = int(self.top or np.iinfo(raw.dtype).max)
        grey = raw if raw.ndim == 2 else raw[..., 0]
        inverted = (top - np.clip(grey, 0, top)).astype(raw.dtype)
        if raw.ndim == 3 and raw.shape[-1] > 1:  # keep the alpha
            return np.concatenate([inverted[..., None], raw[..., 1:]], axis=-1)
        return inverted

    def _with_alpha(self, rgb: np.ndarray, raw: np.ndarray, colour: int) -> np.ndarray:
        if raw.ndim == 3 and raw.shape[-1] > colour:
            alpha = np.rint(self._unit(raw[..., colour]) * 255.0).astype(np.uint8)
            return composite_on_white(np.concatenate([rgb, alpha[..., None]], axis=-1))
        return rgb

    def _cmyk(self, raw: np.ndarray) -> np.ndarray:
        ink = self._unit(raw[..., :4])
        rgb = (1.0 - ink[..., :3]) * (1.0 - ink[..., 3:4])
        return self._with_alpha(np.rint(rgb * 255.0).astype(np.uint8), raw, 4)

    def _lab(self, raw: np.ndarray) -> np.ndarray:
        from skimage.color import lab2rgb

        if raw.ndim != 3 or raw.shape[-1] < 3:
            raise UnsupportedPixels(
                f"{self.photometric} TIFF with {raw.shape[-1] if raw.ndim == 3 else 1} samples"
            )
        if raw.dtype.itemsize not in (1, 2) or raw.dtype.kind not in "ui":
            raise UnsupportedPixels(f"{self.photometric} TIFF of {raw.dtype} samples")
        bits = 8 * raw.dtype.itemsize
        lab = np.empty(raw.shape[:2] + (3,), np.float32)
        lab[..., 0] = raw[..., 0].astype(np.float32) * (100.0 / (2**bits - 1))
        ab = raw[..., 1:3]
        if self.photometric == "CIELAB":  # a*, b* signed (two's complement in the unsigned samples)
            ab = ab.view(np.int8 if bits == 8 else np.int16).astype(np.float32)
        else:  # ICCLAB: unsigned with the neutral axis at the middle
            ab = ab.astype(np.float32) - 2 ** (bits - 1)
        lab[..., 1:] = ab / (1 if bits == 8 else 256)
        rgb = np.empty(raw.shape[:2] + (3,), np.uint8)
        rows = max(1, 2**20 // max(1, raw.shape[1]))  # lab2rgb works in float64: bound its temporaries
        for r in range(0, raw.shape[0], rows):
            rgb[r : r + rows] = np.rint(np.clip(lab2rgb(lab[r : r + rows]), 0, 1) * 255.0)
        return self._with_alpha(rgb, raw, 3)

    def _ycbcr(self, raw: np.ndarray) -> np.ndarray:
        ycc = self._unit(raw[..., :3]) * 255.0
        y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0
        rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
        return self._with_alpha(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), raw, 3)


def _apply_colormap(indices: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """Palette TIFF: (3, N) colormap (16 bit per the spec, 8 bit from some writers) to RGB uint8."""
    cmap = np.asarray(colormap)
    if cmap.max(initial=0) > 255:
        cmap = np.rint(cmap / 257.0)
    lut = cmap.T.astype(np.uint8)
    return lut[np.clip(indices, 0, len(lut) - 1)]


def _tiff_mpp(page: tifffile.TiffPage) -> tuple[float, float] | str | None:
    """(x, y) µm per pixel from XResolution/YResolution and ResolutionUnit (inch or cm), unchecked;
    ``None`` without a physical unit (tifffile writes 1/1 with unit NONE by default)."""
    tags = page.tags
    unit_tag, x_tag, y_tag = tags.get("ResolutionUnit"), tags.get("XResolution"), tags.get("YResolution")
    if unit_tag is None or x_tag is None or y_tag is None:
        return None
    unit = _UNIT_TO_UM.get(int(unit_tag.value))
    if unit is None:
        return None
    unit_name = "inch" if int(unit_tag.value) == 2 else "cm"
    try:
        (xn, xd), (yn, yd) = x_tag.value, y_tag.value
        x_res, y_res = xn / xd, yn / yd
    except (TypeError, ValueError, ZeroDivisionError):
        values = f"{_ratio(x_tag.value)} x {_ratio(y_tag.value)}"
        return f"TIFF resolution {values} pixels per {unit_name} is not a number"
    if not (math.isfinite(x_res) and math.isfinite(y_res) and x_res > 0 and y_res > 0):
        return f"TIFF resolution {x_res:g} x {y_res:g} pixels per {unit_name} is not a positive number"
    return (unit / x_res, unit / y_res)


def _ratio(value) -> str:
    try:
        return f"{value[0]}/{value[1]}"
    except (TypeError, IndexError):
        return repr(value)


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

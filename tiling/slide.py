"""Open any slide or image as a :class:`Slide`: OpenSlide first, then the plain-image reader
(cuCIM only when asked for).

``open_slide`` is the only entry point callers need; it never makes them branch on format and
turns every failure into one :class:`~equislide.tiling.SlideError` subclass with a one-line
message naming the file and the reason.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

import openslide

from ._base import Slide
from ._cucim_slide import CuCIMSlide, import_cucim
from ._errors import (
    CorruptSlideError,
    NotASlideError,
    PermissionDeniedError,
    SlideError,
    SlideNotFoundError,
)
from ._image_slide import MAX_PLAIN_PIXELS, ImageSlide, sniff_format
from ._openslide_slide import OpenSlideSlide

__all__ = ["CuCIMSlide", "ImageSlide", "OpenSlideSlide", "Slide", "open_slide"]

Backend = Literal["auto", "openslide", "image", "cucim"]


def _check_file(path: Path) -> bytes:
    """Stat and open ``path`` for reading; return its first 16 bytes."""
    try:
        st = path.stat()
    except FileNotFoundError as err:
        raise SlideNotFoundError(path, "file not found") from err
    except PermissionError as err:
        raise PermissionDeniedError(path, "permission denied", detail=err.strerror) from err
    except OSError as err:  # ENAMETOOLONG, ELOOP, ENOTDIR on a parent, ...
        raise SlideNotFoundError(path, "cannot access file", detail=err.strerror) from err
    if stat.S_ISDIR(st.st_mode):
        raise NotASlideError(path, "is a directory, not a slide file (MRXS/DICOM: pass the .mrxs/.dcm file)")
    if not stat.S_ISREG(st.st_mode):
        raise NotASlideError(path, "not a regular file (FIFO, socket or device)")
    if st.st_size == 0:
        raise NotASlideError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as fh:
            return fh.read(16)
    except PermissionError as err:
        raise PermissionDeniedError(path, "permission denied", detail=err.strerror) from err
    except OSError as err:
        raise CorruptSlideError(path, "cannot read file", detail=err.strerror) from err


def open_slide(
    path: str | os.PathLike[str],
    *,
    input_mpp: float | None = None,
    force_mpp: float | None = None,
    backend: Backend = "auto",
    max_pixels: int = MAX_PLAIN_PIXELS,
) -> Slide:
    """Open a whole-slide image or a plain image.

    OpenSlide is tried first (SVS, NDPI, MRXS, generic tiled TIFF, ...); when it does not
    recognise the file, the plain-image reader (tifffile for TIFF, PIL otherwise) is tried. So a
    PNG named ``*.svs`` opens as the PNG it is. When both fail, the error class says why (the
    file's magic bytes decide between "unknown format" and "known format, broken") and the
    message carries both readers' reasons.

    Args:
        path: The file.
        input_mpp: µm per level-0 pixel filling in where the file has no usable resolution
            (``mpp_source == "input_mpp"``); usable metadata wins, with a warning in
            :attr:`Slide.mpp_warnings` when they disagree. Rules: :mod:`equislide.tiling._mpp`.
        force_mpp: µm per level-0 pixel replacing the metadata whatever it says
            (``mpp_source == "override"``).
        backend: ``"auto"`` (OpenSlide, then plain image), ``"openslide"`` or ``"image"`` only,
            or ``"cucim"`` (NVIDIA cuCIM, optional: ``pip install cucim-cu12``; TIFF family only,
            never chosen by ``"auto"``).
        max_pixels: Plain images declaring more pixels are refused before decoding.

    Returns:
        An open :class:`Slide`; use it as a context manager.

    Raises:
        SlideNotFoundError: No such file.
        NotASlideError: A directory, special file, empty file or unknown format.
        CorruptSlideError: Truncated or undecodable.
        SlideTooLargeError: A plain image above ``max_pixels`` (decompression bomb).
        UnsupportedImageError: Pixels that cannot become RGB, or a format cuCIM does not read.
        PermissionDeniedError: Not readable by this process.
        ValueError: A bad ``input_mpp``, ``force_mpp`` (or both given) or ``backend``, or
            ``backend="cucim"`` without cuCIM.
    """
    if backend not in ("auto", "openslide", "image", "cucim"):
        raise ValueError(f"backend={backend!r}; use 'auto', 'openslide', 'image' or 'cucim'")
    path = Path(path)
    if backend == "cucim":
        import_cucim(path)  # a missing optional dependency outranks anything about the file
        _check_file(path)
        return CuCIMSlide(path, input_mpp=input_mpp, force_mpp=force_mpp)
    head = _check_file(path)
    fmt = sniff_format(head)
    openslide_err: Exception | None = None
    if backend in ("auto", "openslide"):
        try:
            return OpenSlideSlide(path, input_mpp=input_mpp, force_mpp=force_mpp)
        except openslide.OpenSlideUnsupportedFormatError as err:
            openslide_err = err
        except openslide.OpenSlideError as err:
            raise CorruptSlideError(path, "OpenSlide cannot read it", detail=f"OpenSlide: {err}") from err
        if backend == "openslide":
            cls = NotASlideError if fmt is None else CorruptSlideError
            detail = f"OpenSlide: {openslide_err}"
            raise cls(path, "not a format OpenSlide reads", detail=detail) from openslide_err
    try:
        return ImageSlide(path, input_mpp=input_mpp, force_mpp=force_mpp, max_pixels=max_pixels)
    except SlideError as fallback_err:
        if openslide_err is None:
            raise
        detail = f"OpenSlide: {openslide_err}"
        if fallback_err.detail:
            detail = f"{fallback_err.detail}; {detail}"
        raise type(fallback_err)(path, fallback_err.reason, detail=detail) from openslide_err

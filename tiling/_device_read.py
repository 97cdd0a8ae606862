"""Regions decoded on the GPU by cuCIM where it reads the format, else by the usual readers on the host.

cuCIM reads the TIFF family only (its documented formats: Aperio SVS, Philips TIFF, generic tiled or
stripped multi-resolution TIFF; JPEG, JPEG 2000, deflate, LZW or raw tiles) and decodes JPEG / JPEG 2000
tiles on the GPU (nvJPEG; nvImageCodec in its ``cuslide2`` plugin). Everything else (NDPI, MRXS, SCN,
plain PNG / JPEG ...) and every machine without cuCIM, cupy or a GPU goes through
:func:`~equislide.tiling.open_slide` (OpenSlide, then the plain-image reader) and gets numpy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ._image_slide import sniff_format

__all__ = ["GPU_DECODE_FORMATS", "gpu_decode_reader", "read_region_on_device"]

#: Formats (as the readers' magic-byte sniffing names them; BigTIFF counts as TIFF) cuCIM reads.
GPU_DECODE_FORMATS = ("TIFF",)


def gpu_decode_reader(path: str | os.PathLike[str]) -> str:
    """``"cucim-gpu"`` when ``path`` would be decoded on the GPU (cuCIM and cupy importable, a GPU
    present, a TIFF-family file), else ``"host"`` (OpenSlide or the plain-image reader)."""
    from equislide.arrays import cupy_or_none

    if importlib.util.find_spec("cucim") is None or cupy_or_none() is None:
        return "host"
    try:
        with open(path, "rb") as fh:
            fmt = sniff_format(fh.read(16))
    except OSError:
        return "host"  # the host reader raises the error that names the problem
    return "cucim-gpu" if fmt in GPU_DECODE_FORMATS else "host"


def read_region_on_device(
    path: str | os.PathLike[str],
    l0_xy: tuple[int, int],
    level: int,
    size: tuple[int, int],
    *,
    device: str = "cuda",
    input_mpp: float | None = None,
) -> Any:
    """``(height, width, 3)`` uint8 RGB of one pyramid level, white outside the image: a cupy array on
    ``device`` when :func:`gpu_decode_reader` says ``"cucim-gpu"``, else numpy from
    :func:`~equislide.tiling.open_slide` (whose errors it raises: one line naming the file).

    Args:
        path: The slide file.
        l0_xy: (x, y) of the top-left pixel in the level-0 plane (px).
        level: Pyramid level.
        size: (width, height) in level-``level`` px.
        device: The GPU for cuCIM's decode.
        input_mpp: As in :func:`~equislide.tiling.open_slide`.
    """
    from ._cucim_slide import CuCIMSlide
    from .slide import open_slide

    if gpu_decode_reader(path) == "cucim-gpu":
        with CuCIMSlide(Path(path), input_mpp=input_mpp) as slide:
            return slide.read_region_device(l0_xy, level, size, device=device)
    with open_slide(path, input_mpp=input_mpp) as slide:
        return slide.read_region(l0_xy, level, size)

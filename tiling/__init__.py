"""Slide readers, tissue masks, TMA dearraying and rotation of inputs.

- :func:`open_slide` -> :class:`Slide` (:class:`OpenSlideSlide`, :class:`ImageSlide` or, optional,
  :class:`CuCIMSlide`): read RGB at a level (:meth:`Slide.read_region`) or a resolution
  (:meth:`Slide.read_region_mpp`), and thumbnails; every failure is a :class:`SlideError` subclass
  with a one-line message.
- :func:`tissue_mask`, :func:`pen_mask`: boolean masks on thumbnails.
- :func:`find_cores`, :func:`is_tma`, :class:`Core`: TMA dearraying with grid names ("B3").
- :func:`tissue_grid`, :func:`core_grids`, :class:`TileGrid`: tile grids at the analysis resolution.
- :func:`tile_slide` -> [:class:`SampleResult`]: one input file to per-sample zarr tile stores; the
  same in two steps a cluster can spread: :func:`plan_slide` -> :class:`SlidePlan` (thumbnail, mask,
  cores, grids) and :func:`write_samples` (the tile reads and writes of some of its samples).
- :func:`rotate_image`, :func:`rotate_labels`, :func:`unrotate_labels`: rotation about the centre.

Plain numpy / scikit-image / OpenSlide / tifffile code, usable from a notebook: nothing here imports
``equislide.flows`` or Prefect.
"""

from __future__ import annotations

from ._errors import (
    CorruptSlideError,
    NotASlideError,
    NoTissueError,
    PermissionDeniedError,
    SlideError,
    SlideNotFoundError,
    SlideTooLargeError,
    UnsupportedImageError,
)
from ._image_slide import MAX_PLAIN_PIXELS
from .rotation import rotate_image, rotate_labels, unrotate_labels
from .slide import CuCIMSlide, ImageSlide, OpenSlideSlide, Slide, open_slide
from .tissue import pen_mask, tissue_mask
from .tma import Core, core_name, find_cores, is_tma

__all__ = [
    "MAX_PLAIN_PIXELS",
    "Core",
    "CorruptSlideError",
    "CuCIMSlide",
    "ImageSlide",
    "NoTissueError",
    "NotASlideError",
    "OpenSlideSlide",
    "PermissionDeniedError",
    "Slide",
    "SlideError",
    "SlideNotFoundError",
    "SlideTooLargeError",
    "UnsupportedImageError",
    "core_name",
    "find_cores",
    "is_tma",
    "open_slide",
    "pen_mask",
    "rotate_image",
    "rotate_labels",
    "tissue_mask",
    "unrotate_labels",
]

# Synthetic H&E TMA phantom (tiling/phantom.py).
from equislide.tiling.phantom import LABEL_NAMES as LABEL_NAMES  # noqa: E402
from equislide.tiling.phantom import PhantomCore as PhantomCore  # noqa: E402
from equislide.tiling.phantom import PhantomInfo as PhantomInfo  # noqa: E402
from equislide.tiling.phantom import read_phantom_info as read_phantom_info  # noqa: E402
from equislide.tiling.phantom import write_phantom as write_phantom  # noqa: E402

__all__ += ["LABEL_NAMES", "PhantomCore", "PhantomInfo", "read_phantom_info", "write_phantom"]

# Tile grids (tiling/grid.py) and the slide -> tile stores pipeline (tiling/pipeline.py).
from equislide.tiling.grid import TileGrid as TileGrid  # noqa: E402
from equislide.tiling.grid import analysis_scale as analysis_scale  # noqa: E402
from equislide.tiling.grid import core_grids as core_grids  # noqa: E402
from equislide.tiling.grid import core_tile_side as core_tile_side  # noqa: E402
from equislide.tiling.grid import tissue_grid as tissue_grid  # noqa: E402
from equislide.tiling.pipeline import SamplePlan as SamplePlan  # noqa: E402
from equislide.tiling.pipeline import SampleResult as SampleResult  # noqa: E402
from equislide.tiling.pipeline import SlidePlan as SlidePlan  # noqa: E402
from equislide.tiling.pipeline import plan_slide as plan_slide  # noqa: E402
from equislide.tiling.pipeline import tile_slide as tile_slide  # noqa: E402
from equislide.tiling.pipeline import tiling_params as tiling_params  # noqa: E402
from equislide.tiling.pipeline import write_samples as write_samples  # noqa: E402

__all__ += [
    "SamplePlan",
    "SampleResult",
    "SlidePlan",
    "TileGrid",
    "analysis_scale",
    "core_grids",
    "core_tile_side",
    "plan_slide",
    "tile_slide",
    "tiling_params",
    "tissue_grid",
    "write_samples",
]

"""Slide readers, tissue masks, TMA dearraying and rotation of inputs.

- :func:`open_slide` -> :class:`Slide` (:class:`OpenSlideSlide`, :class:`ImageSlide` or, optional,
  :class:`CuCIMSlide`): read RGB at a level (:meth:`Slide.read_region`) or a resolution
  (:meth:`Slide.read_region_mpp`), and thumbnails; every failure is a :class:`SlideError` subclass
  with a one-line message.
- :func:`tissue_mask`, :func:`pen_mask`: boolean masks on thumbnails.
- :func:`find_cores`, :func:`is_tma`, :class:`Core`: TMA dearraying with grid names ("B3");
  :func:`fill_grid`: every grid position, missing cores placed on the fitted lattice.
- :func:`write_phantom` (a synthetic TMA) and :func:`write_whole_slide_phantom` (a large synthetic
  section, streamed tile by tile), each with its ground truth.
- :func:`tissue_grid`, :func:`core_grids`, :class:`TileGrid`: tile grids at the analysis resolution.
- :func:`plan_samples` -> :class:`SlideLayout` of :class:`SamplePlan` (thumbnail, mask, cores, grids)
  and :func:`read_tile_batches` (a planned sample's tiles); storing them is the tile stage's job
  (:mod:`equislide.stages.tile`).
- :func:`rotate_image`, :func:`rotate_labels`, :func:`unrotate_labels`: rotation about the centre.

Coordinate planes, one prefix each, everywhere in the package (as ``openslide/deepzoom.py`` names them):

- ``l0_``: pixel (x, y) in the slide's level 0, the full-resolution image; x to the right, y down.
- ``lv_``: pixel (x, y) in a pyramid level the readers read from (``level_dimensions[level]``).
- ``l_``: pixel (x, y) at the *analysis resolution* (``--mpp``, default 2.5 µm/px); one ``l_`` pixel
  spans ``l0_per_l`` level-0 pixels along (x, y) (that name, in the stores' attributes too).
- ``m_``: pixel (x, y) of the tissue mask (a thumbnail); one spans ``l_per_m`` analysis pixels.
- ``t_``: (row, col) of a tile in a grid; ``f_``: feature-map pixel, ``stride`` analysis pixels each.
- ``thumb_``: pixel of a thumbnail while it is being read.

Before this naming was fixed, ``l_`` meant "pyramid level" in the readers and "analysis plane" in the
grids; only the readers' local names changed, so every stored attribute keeps its meaning.

Plain numpy / scikit-image / OpenSlide / tifffile code, usable from a notebook: nothing here imports
``equislide.stages``, ``equislide.flows``, Prefect or Dask, and nothing here writes a store.
"""

from __future__ import annotations

from ._base import MAX_BLOCK_BYTES, MAX_THUMBNAIL_READ_PIXELS
from ._device_read import GPU_DECODE_FORMATS, gpu_decode_reader, read_region_on_device
from ._errors import (
    CorruptSlideError,
    NotASlideError,
    NoTissueError,
    NoUsableMppError,
    PermissionDeniedError,
    SlideError,
    SlideNotFoundError,
    SlideTooLargeError,
    UnsupportedImageError,
)
from ._image_slide import MAX_PLAIN_PIXELS
from ._mpp import MPP_RANGE
from .rotation import rotate_image, rotate_labels, unrotate_labels
from .slide import CuCIMSlide, ImageSlide, OpenSlideSlide, Slide, open_slide
from .tissue import pen_mask, tissue_mask
from .tma import Core, core_name, fill_grid, find_cores, is_tma

__all__ = [
    "GPU_DECODE_FORMATS",
    "MAX_PLAIN_PIXELS",
    "MAX_BLOCK_BYTES",
    "MAX_THUMBNAIL_READ_PIXELS",
    "MPP_RANGE",
    "Core",
    "CorruptSlideError",
    "CuCIMSlide",
    "ImageSlide",
    "NoTissueError",
    "NoUsableMppError",
    "NotASlideError",
    "OpenSlideSlide",
    "PermissionDeniedError",
    "Slide",
    "SlideError",
    "SlideNotFoundError",
    "SlideTooLargeError",
    "UnsupportedImageError",
    "core_name",
    "fill_grid",
    "gpu_decode_reader",
    "find_cores",
    "is_tma",
    "open_slide",
    "pen_mask",
    "read_region_on_device",
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

# Synthetic H&E whole slide, streamed (tiling/phantom_slide.py).
from equislide.tiling.phantom_slide import PhantomPiece as PhantomPiece  # noqa: E402
from equislide.tiling.phantom_slide import PhantomSlideInfo as PhantomSlideInfo  # noqa: E402
from equislide.tiling.phantom_slide import read_whole_slide_phantom_info as read_whole_slide_phantom_info  # noqa: E402
from equislide.tiling.phantom_slide import write_whole_slide_phantom as write_whole_slide_phantom  # noqa: E402

__all__ += ["PhantomPiece", "PhantomSlideInfo", "read_whole_slide_phantom_info", "write_whole_slide_phantom"]

# Tile grids (tiling/grid.py) and each input's samples laid out (tiling/layout.py).
from equislide.tiling.grid import TileGrid as TileGrid  # noqa: E402
from equislide.tiling.grid import analysis_scale as analysis_scale  # noqa: E402
from equislide.tiling.grid import core_grids as core_grids  # noqa: E402
from equislide.tiling.grid import core_tile_side as core_tile_side  # noqa: E402
from equislide.tiling.grid import tissue_grid as tissue_grid  # noqa: E402
from equislide.tiling.layout import MAX_TILES as MAX_TILES  # noqa: E402
from equislide.tiling.layout import MIN_SIDE as MIN_SIDE  # noqa: E402
from equislide.tiling.layout import NO_MPP_WARNING as NO_MPP_WARNING  # noqa: E402
from equislide.tiling.layout import THUMBNAIL_MAX as THUMBNAIL_MAX  # noqa: E402
from equislide.tiling.layout import SamplePlan as SamplePlan  # noqa: E402
from equislide.tiling.layout import SlideLayout as SlideLayout  # noqa: E402
from equislide.tiling.layout import plan_samples as plan_samples  # noqa: E402
from equislide.tiling.layout import read_tile_batches as read_tile_batches  # noqa: E402

__all__ += [
    "MAX_TILES",
    "MIN_SIDE",
    "NO_MPP_WARNING",
    "THUMBNAIL_MAX",
    "SamplePlan",
    "SlideLayout",
    "TileGrid",
    "analysis_scale",
    "core_grids",
    "core_tile_side",
    "plan_samples",
    "read_tile_batches",
    "tissue_grid",
]

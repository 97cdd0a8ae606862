"""equislide: label-free, rotation-consistent tissue segmentation of whole slides and TMA cores.

The package root holds the CLI and configuration; the libraries live in subpackages:
``equislide.tiling`` (slides, tissue, TMA cores, tiles), ``equislide.models`` (SRE-Conv, SRENet,
baselines, K-means), ``equislide.storage`` (zarr stores, outputs) and ``equislide.flows`` (Prefect).
"""

from __future__ import annotations

from equislide._version import __version__ as __version__

__all__ = ["__version__"]

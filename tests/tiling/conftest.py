"""Synthetic images for the tiling tests, written once per session with tifffile / PIL."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile


def _gradient_rgb(height: int, width: int) -> np.ndarray:
    """A deterministic RGB image whose every pixel encodes its (row, col)."""
    rows, cols = np.mgrid[:height, :width]
    channels = [(cols * 255) // max(1, width - 1), (rows * 255) // max(1, height - 1), (rows + cols) % 256]
    return np.stack(channels, axis=-1).astype(np.uint8)


@pytest.fixture(scope="session")
def gradient_rgb() -> np.ndarray:
    """(300, 400, 3) uint8 reference pixels."""
    return _gradient_rgb(300, 400)


@pytest.fixture(scope="session")
def plain_tiff(tmp_path_factory: pytest.TempPathFactory, gradient_rgb: np.ndarray) -> Path:
    """A stripped (non-tiled) RGB TIFF at 0.5 µm/px (20000 px per cm), which OpenSlide refuses."""
    path = tmp_path_factory.mktemp("plain") / "core.tif"
    tifffile.imwrite(
        path, gradient_rgb, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER"
    )
    return path


def patch_tiff_size(path: Path, width: int, height: int) -> None:
    """Rewrite ImageWidth / ImageLength of the first page as LONG values (header-only bomb)."""
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_bigtiff and tif.byteorder == "<"
        offsets = {name: tif.pages.first.tags[name].offset for name in ("ImageWidth", "ImageLength")}
    with open(path, "r+b") as fh:
        for name, value in (("ImageWidth", width), ("ImageLength", height)):
            fh.seek(offsets[name] + 2)
            fh.write(struct.pack("<HII", 4, 1, value))  # type LONG, count 1, value


@pytest.fixture(scope="session")
def tiff_bomb() -> Callable[[Path, int, int], Path]:
    """``tiff_bomb(path, width, height)``: an 8x8 RGB TIFF whose header declares width x height."""

    def make(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
        tifffile.imwrite(path, np.zeros((8, 8, 3), dtype=np.uint8), photometric="rgb")
        patch_tiff_size(path, width, height)
        return path

    return make

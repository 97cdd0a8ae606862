"""Synthetic images for the tiling tests, written once per session with tifffile / PIL."""

from __future__ import annotations

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

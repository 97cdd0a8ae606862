"""A large generated sample: one tissue-like plain image that tiles into hundreds of small tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_large_image(path: Path, *, side: int = 2048, seed: int = 0) -> Path:
    """An RGB TIFF of ``side`` px: a pink, textured ellipse over most of a white background (the
    tissue mask keeps it), so that at a coarse mpp it gives hundreds of tiles of one sample."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side - 0.5
    tissue = (xx / 0.48) ** 2 + (yy / 0.45) ** 2 < 1
    texture = rng.normal(0, 1, (side // 8, side // 8, 3)).repeat(8, 0).repeat(8, 1)
    pink = np.array([200.0, 120.0, 170.0]) + 30 * texture
    img = np.where(tissue[..., None], pink, 245.0)
    tifffile.imwrite(path, np.clip(img, 0, 255).astype(np.uint8), photometric="rgb")
    return path


def tiled_large_sample(root: Path, spec) -> dict:
    """The large image tiled into one sample (~170 tiles of 32 px at 4 µm/px) and a backbone calibrated
    on it: ``{"root", "store", "n", "backbone"}``."""
    from equislide import stages

    image = write_large_image(root / "large.tiff")
    [res] = stages.tile_slide(image, root / "tiles", mpp=4.0, input_mpp=1.0, tile=32, halo=8)
    backbone = stages.calibrated_backbone([res.store], root / "models", spec)
    return {"root": root, "store": Path(res.store), "n": res.n_tiles, "backbone": backbone}

"""Stand-ins for trained weights, made by the tests: a seeded network saved and made the default of a
registry folder (what ``EQUISLIDE_WEIGHTS_DIR`` names)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from equislide.files import sha256_file
from equislide.models.defaults import REGISTRY_FORMAT


def standin_weights(folder: Path, tiles: np.ndarray, *, width: int = 8, **entry) -> Path:
    """A seeded width-``width`` SRENet-18 with its BatchNorm calibrated on ``tiles`` (finite float16
    features, as trained statistics give), saved in ``folder`` and made the registry's srenet18 default
    (``entry`` overrides registry fields). Returns the checkpoint's path."""
    from equislide.models import save_checkpoint
    from equislide.models.extract import prepare_backbone

    model, _ = prepare_backbone(
        "srenet18", layer=4, calibration_tiles=tiles, seed=7, device="cpu", model_kwargs={"width": width}
    )
    path = save_checkpoint(model, folder / "srenet18.safetensors", provenance={"stand-in": True})
    record = {"file": path.name, "sha256": sha256_file(path), "default": True, "why": "a test"} | entry
    doc = {"format": REGISTRY_FORMAT, "format_version": 1, "backbones": {"srenet18": record}}
    (folder / "defaults.json").write_text(json.dumps(doc), encoding="utf-8")
    return path

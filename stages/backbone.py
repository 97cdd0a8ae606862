"""The backbone stage: the one network every feature task of a run loads.

Given weights are used as they are. Without, the backbone's packaged default weights are used when the
package's registry makes some the default (:mod:`equislide.models.defaults`; their BatchNorm statistics
as trained, unless the registry asks for recalibration); else, or with ``weights="random"``, a seeded
random initialisation has its BatchNorm recalibrated on a deterministic choice of the cohort's tiles.
A recalibrated network is saved (safetensors + JSON) under the run's ``models/`` folder, so every
worker (and a resumed run) loads the very same network.
:func:`load_backbone` loads a :class:`~equislide.specs.BackboneRef` once per process.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equislide.specs import CLUSTER_FORMAT, RANDOM_WEIGHTS, BackboneRef, FeatureSpec

__all__ = ["calibrated_backbone", "clear_backbone_cache", "load_backbone", "packaged_default", "read_tiles"]

_BACKBONES: dict[tuple[str, str, int, str], Any] = {}


def read_tiles(store: str | Path, start: int, stop: int) -> np.ndarray:
    """Tiles ``start:stop`` of a finished store, ``(n, side, side, 3)`` uint8."""
    from equislide.storage import open_tiles

    return np.asarray(open_tiles(store)[start:stop].compute(scheduler="synchronous"))


def calibrated_backbone(
    stores: Sequence[str | Path],
    out_dir: str | Path,
    spec: FeatureSpec | None = None,
    *,
    packaged: Any = "resolve",
) -> BackboneRef:
    """The backbone checkpoint every feature task loads, and how it was made.

    Args:
        stores: Finished tile stores of the cohort (the calibration tiles come from them).
        out_dir: Folder for a calibrated random initialisation (``backbone-<key>.safetensors``).
        spec: The network (default :class:`~equislide.specs.FeatureSpec`). Calibration tiles are taken
            round-robin over the stores sorted by sample ID, evenly spaced within each store, so the
            choice depends only on the stores.
        packaged: The packaged default weights to use when ``spec.weights`` is None, as
            :func:`packaged_default` gives them (None: random); ``"resolve"`` (default) looks them up
            here. A flow resolves them where it starts, so its workers use what it saw.

    Returns:
        The reference; ``status`` is ``"given"``, ``"written"`` or ``"skipped"`` (an earlier run's);
        ``precision`` is ``spec.precision`` resolved here, on this process's device
        (:func:`~equislide.models.extract.resolve_precision`), once for every feature task of the run.

    Raises:
        ModelConfigError: ``spec.precision`` cannot run on the device (fp16 on a CPU).
    """
    from equislide.files import sha256_file
    from equislide.models.checkpoint import save_checkpoint
    from equislide.models.extract import prepare_backbone, resolve_precision
    from equislide.storage import params_hash, read_sample_meta, store_identity

    spec = spec or FeatureSpec()
    precision = resolve_precision(spec.precision, spec.device)
    if spec.weights is not None:
        packaged = None
    elif packaged == "resolve":
        packaged = packaged_default(spec)
    if packaged is not None and not packaged.recalibrate:
        return BackboneRef(
            path=str(packaged.path),
            sha256=packaged.sha256,
            backbone=spec.backbone,
            layer=int(spec.layer),
            weights_random=False,
            provenance={
                "source": "packaged",
                "weights": packaged.label(),
                "name": packaged.name,
                "sha256": packaged.sha256,
                "why": packaged.why,
                "batchnorm": "as trained (not recalibrated)",
            },
            status="given",
            precision=precision,
        )
    if spec.weights not in (None, RANDOM_WEIGHTS):
        path = Path(spec.weights)
        path = path.with_suffix(".safetensors") if path.suffix == ".json" else path
        return BackboneRef(
            path=str(path),
            sha256=sha256_file(path),
            backbone=spec.backbone,
            layer=int(spec.layer),
            weights_random=False,
            provenance={"weights": str(path)},
            status="given",
            precision=precision,
        )
    metas = sorted(((read_sample_meta(s), Path(s)) for s in stores), key=lambda m: m[0]["sample_id"])
    if not metas:
        raise ValueError("no finished tile store to calibrate BatchNorm on; tiling gave no sample")
    # Round-robin over samples, evenly spaced tiles within each: deterministic in the stores alone.
    n_cal = spec.calibration_tiles
    per_store = max(1, -(-n_cal // len(metas)))
    picks: list[tuple[Path, int]] = []
    for rank in range(per_store):
        for meta, store in metas:
            n = int(meta["n_tiles"])
            if rank < n and len(picks) < n_cal:
                picks.append((store, (rank * n) // min(n, per_store)))
    provenance = {
        "format": CLUSTER_FORMAT,
        "init": f"random(seed={spec.seed})",
        "backbone": spec.backbone,
        "layer": int(spec.layer),
        "model_kwargs": dict(spec.model_kwargs),
        "batchnorm": "recalibrated on the cohort's tiles",
        "calibration": [{**store_identity(s), "tile": int(i)} for s, i in picks],
    }
    if packaged is not None:  # trained weights whose registry entry asks for recalibration
        provenance.update(
            source="packaged",
            init=packaged.label(),
            name=packaged.name,
            sha256=packaged.sha256,
            why=packaged.why,
            model_kwargs={},
        )
    key = params_hash(provenance)[:16]
    from equislide.storage.confine import confined

    path = confined(out_dir, Path(out_dir) / f"backbone-{key}.safetensors")

    def ref(status: str) -> BackboneRef:
        return BackboneRef(
            path=str(path),
            sha256=sha256_file(path),
            backbone=spec.backbone,
            layer=int(spec.layer),
            weights_random=packaged is None,
            provenance=provenance,
            status=status,
            precision=precision,
        )

    if path.with_suffix(".json").is_file() and _checkpoint_intact(path):
        return ref("skipped")
    # Tiles of different sides (TMA cores of several slides) are calibrated in separate batches; only
    # the sides the picks have: a cohort's later slides may have sides no pick comes from.
    tiles = [read_tiles(s, i, i + 1) for s, i in picks]
    # Spilled calibration activations (GBs for 16 full-width tiles) stay on the run's own disk.
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    sides = sorted({t.shape[1] for t in tiles})
    batches = [np.concatenate([t for t in tiles if t.shape[1] == side]) for side in sides]
    model, _ = prepare_backbone(
        spec.backbone,
        weights=None if packaged is None else packaged.path,
        layer=spec.layer,
        calibration_tiles=batches,
        seed=spec.seed,
        device="cpu",
        recalibrate=True,
        model_kwargs=dict(spec.model_kwargs) if packaged is None else None,
        scratch=out_dir,
    )
    # Both files land together: written in a private folder, then renamed (sidecar first).
    tmp_dir = Path(out_dir) / f".backbone-{key}.partial-{uuid.uuid4().hex[:12]}"
    try:
        save_checkpoint(model, tmp_dir / path.name, provenance=provenance)
        path.parent.mkdir(parents=True, exist_ok=True)
        (tmp_dir / path.with_suffix(".json").name).replace(path.with_suffix(".json"))
        (tmp_dir / path.name).replace(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ref("written")


def packaged_default(spec: FeatureSpec):
    """The packaged default weights a run of ``spec`` without ``weights`` uses, or None (random).

    None also when ``spec.model_kwargs`` ask for a network the packaged one is not (``--width 16``
    against weights trained at width 64): builder arguments only ever describe random weights.

    Raises:
        DefaultWeightsError: the registry or the default's file is broken (a damaged installation).
    """
    from equislide.models.checkpoint import read_checkpoint_document
    from equislide.models.defaults import packaged_weights

    found = packaged_weights(spec.backbone)
    if found is None or not spec.model_kwargs:
        return found
    config = read_checkpoint_document(found.path)["model"]
    if all(k in config and config[k] == v for k, v in spec.model_kwargs.items()):
        return found
    return None


def _checkpoint_intact(path: Path) -> bool:
    """The checkpoint's header, config and checksum hold (a truncated or swapped file is made again)."""
    from equislide.models._errors import CheckpointError
    from equislide.models.checkpoint import read_checkpoint_document

    try:
        read_checkpoint_document(path)
    except (CheckpointError, OSError):
        return False
    return True


def load_backbone(backbone: BackboneRef, device: str = "auto") -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint once per process; later calls with the same network and device reuse it.

    Returns:
        ``(model, info)`` as :func:`equislide.models.extract.prepare_backbone` gives them.

    Raises:
        ValueError: the file's SHA-256 is no longer the one the reference recorded.
    """
    from equislide.models.extract import prepare_backbone, resolve_device

    dev = str(resolve_device(device))
    key = (backbone.backbone, backbone.sha256, int(backbone.layer), dev)
    if key not in _BACKBONES:
        model, info = prepare_backbone(
            backbone.backbone, weights=backbone.path, layer=backbone.layer, device=dev
        )
        if info["weights_sha256"] != backbone.sha256:
            raise ValueError(
                f"{backbone.path} has sha256 {info['weights_sha256']}, expected {backbone.sha256}; it changed"
            )
        _BACKBONES[key] = (model, info)
    return _BACKBONES[key]


def clear_backbone_cache() -> None:
    """Forget every cached network (tests; or to free memory in a long-lived worker)."""
    _BACKBONES.clear()

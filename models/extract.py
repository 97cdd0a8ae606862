"""Feature extraction on a batch of tiles: normalise, run ``features(x, layer)``, crop the halo.

A tile store holds uint8 RGB tiles ``(B, T, T, 3)`` with ``T = tile + 2 * halo``. This module turns
such a batch into float32 feature maps of the tile *interiors* ``(B, C, tile / s, tile / s)``, where
``s = backbone.feature_strides[layer - 1]`` (SRENet: 1, 2, 4, 8; ResNet-18: 2, 4, 8, 16). The halo is
cropped at feature resolution (``halo / s`` feature pixels per side), so stitching interiors gives a
seamless map.

Normalisation (one constant for every backbone, recorded in :data:`NORMALISATION` and in every
feature store): ``x = (rgb / 255 - 0.5) / 0.25``, i.e. mean 0.5 and std 0.25 for each channel.

.. warning::

    Untrained SRENet weights with default BatchNorm statistics give activations of ~1e7 by layer 4
    (radial kernels have a large DC gain), which overflow float16 (max 65504). :func:`prepare_backbone`
    therefore recalibrates BatchNorm on a few tiles whenever the weights are random, and
    :func:`to_float16` refuses (with :class:`FeatureRangeError`) to cast anything non-finite or too large.

Precision (:func:`resolve_precision`): the forward pass runs in float32 or under ``torch.autocast`` in
bfloat16 / float16; the feature maps come back as float32 either way, and are stored as float16.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from equislide.files import sha256_file
from equislide.models._errors import FeatureRangeError, ModelConfigError
from equislide.models._registry import create_model
from equislide.models.calibration import recalibrate_batchnorm
from equislide.models.checkpoint import load_checkpoint

__all__ = [
    "FEATURE_PRECISIONS",
    "FLOAT16_SAFE_MAX",
    "NORMALISATION",
    "FeatureRangeError",
    "extract_features",
    "feature_stride",
    "normalise_tiles",
    "prepare_backbone",
    "bf16_native",
    "resolve_device",
    "resolve_precision",
    "to_float16",
]

_MEAN = 0.5
_STD = 0.25
#: The input normalisation applied to every tile: ``(rgb / 255 - mean) / std`` per channel.
NORMALISATION: dict[str, Any] = {
    "formula": "(rgb / 255 - mean) / std",
    "mean": [_MEAN, _MEAN, _MEAN],
    "std": [_STD, _STD, _STD],
}
#: Largest magnitude :func:`to_float16` accepts (float16's max is 65504; keep headroom for rounding).
FLOAT16_SAFE_MAX = 60000.0
# Micro-batch of the recalibration passes: it sets their memory (the statistics are over all tiles).
_CALIBRATION_BATCH = 2
#: ``precision`` values :func:`resolve_precision` takes; it resolves ``auto`` to one of the others.
FEATURE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to :class:`torch.device`.

    Raises:
        ModelConfigError: A CUDA device was asked for on a machine without one.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(
            f"device={str(device)!r} but CUDA is not available; use device='cpu' or 'auto'"
        )
    return dev


def bf16_native(device: str | torch.device = "auto") -> bool:
    """The device computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AVX-512
    BF16 or AMX tiles (elsewhere oneDNN emulates bfloat16, slower than float32)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str = "auto", device: str | torch.device = "auto") -> str:
    """The forward precision of feature extraction on ``device``: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``auto`` is ``bf16`` where the device computes it in hardware (:func:`bf16_native`), else ``fp32``.

    Raises:
        ModelConfigError: An unknown precision, or ``fp16`` on a CPU: CPUs have no float16 matrix
            units outside AMX-FP16 (emulated, it is slower than float32) and float16's range (65504)
            risks overflow inside the network where bfloat16 keeps float32's range.
    """
    if precision not in FEATURE_PRECISIONS:
        raise ModelConfigError(f"precision={precision!r} is not one of {', '.join(FEATURE_PRECISIONS)}")
    dev = resolve_device(device)
    if precision == "auto":
        return "bf16" if bf16_native(dev) else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise ModelConfigError(
            "precision='fp16' is for GPUs: on a CPU it is emulated (slower than fp32) and its range "
            "(65504) risks overflow inside the network; use 'bf16' or 'fp32'"
        )
    return precision


def feature_stride(backbone: nn.Module, layer: int) -> int:
    """Input pixels per feature pixel after stage ``layer`` (1-4) of ``backbone``."""
    strides = getattr(backbone, "feature_strides", None)
    if strides is None:
        raise ModelConfigError(f"{type(backbone).__name__} has no feature_strides; it is not a backbone")
    if layer not in (1, 2, 3, 4):
        raise ModelConfigError(f"layer={layer!r} is not a stage of this backbone; use 1, 2, 3 or 4")
    return int(strides[layer - 1])


def normalise_tiles(tiles: np.ndarray | Tensor, *, device: str | torch.device = "cpu") -> Tensor:
    """uint8 tiles ``(B, T, T, 3)`` -> normalised float32 ``(B, 3, T, T)`` on ``device``.

    The uint8 batch is moved to the device once (4x fewer bytes than float32), then converted there;
    a cupy batch (GPU decode) is taken over through DLPack where it lies (no host round trip).
    """
    from equislide.arrays import to_torch

    t = to_torch(tiles)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"tiles must be uint8 (B, T, T, 3) RGB, got {t.dtype} {tuple(t.shape)}")
    t = t.to(resolve_device(device), non_blocking=True)
    x = t.permute(0, 3, 1, 2).float()
    return (x / 255.0 - _MEAN) / _STD


def extract_features(
    backbone: nn.Module,
    tiles: np.ndarray | Tensor,
    *,
    layer: int,
    halo: int,
    device: str | torch.device = "auto",
    precision: str = "fp32",
) -> np.ndarray:
    """Feature maps of the tile interiors.

    Args:
        backbone: A model with ``features(x, layer)`` and ``feature_strides`` (eval mode is set here).
        tiles: uint8 ``(B, T, T, 3)`` RGB tiles, halo included (``T = tile + 2 * halo``).
        layer: Stage 1-4.
        halo: Halo of the tiles in input pixels; must be a multiple of the layer's stride ``s``, and so
            must ``T``, so that ``halo / s`` feature pixels are cropped exactly on each side.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...; the backbone is moved there.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` to run the forward pass under ``torch.autocast``
            (the weights stay float32); ``"auto"`` as :func:`resolve_precision`.

    Returns:
        float32 ``(B, C, tile / s, tile / s)`` on the CPU, in (row, col) = (y, x) order like the tiles.

    Raises:
        ModelConfigError: ``layer`` is not 1-4, ``halo`` / ``T`` is not a multiple of the stride, or
            ``precision`` is unknown (or fp16 on a CPU).
        ValueError: ``tiles`` is not a uint8 ``(B, T, T, 3)`` batch.
    """
    stride = feature_stride(backbone, layer)
    arr = torch.as_tensor(tiles)
    if arr.ndim != 4 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"tiles must be square (B, T, T, 3), got shape {tuple(arr.shape)}")
    side = int(arr.shape[1])
    if halo < 0 or 2 * halo >= side:
        raise ValueError(f"halo={halo} must be >= 0 and leave an interior in tiles of side {side}")
    if halo % stride or side % stride:
        raise ModelConfigError(
            f"halo={halo} and tile side {side} must be multiples of the layer-{layer} stride {stride} so "
            "the halo crops to whole feature pixels; choose a halo (and tile) divisible by the stride"
        )
    dev = resolve_device(device)
    dtype = _AUTOCAST.get(resolve_precision(precision, dev))
    backbone.to(dev).eval()
    f_halo = halo // stride
    with torch.inference_mode():
        x = normalise_tiles(arr, device=dev)
        # Autocast rather than a bf16 copy of the model: the weights stay float32 (one cached network
        # serves every precision) and reductions keep float32 accumulators.
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            f = backbone.features(x, layer)  # type: ignore[operator]
        f_side = side // stride
        if tuple(f.shape[-2:]) != (f_side, f_side):
            raise ModelConfigError(
                f"layer {layer} gave {tuple(f.shape[-2:])} feature pixels for {side}-px tiles, expected "
                f"({f_side}, {f_side}) at stride {stride}"
            )
        if f_halo:
            f = f[:, :, f_halo : f_side - f_halo, f_halo : f_side - f_halo]
        return f.float().contiguous().cpu().numpy()


def to_float16(features: np.ndarray, *, max_abs: float = FLOAT16_SAFE_MAX) -> np.ndarray:
    """Cast features to float16 for storage, refusing values float16 cannot hold.

    Args:
        features: Any float array.
        max_abs: Largest magnitude accepted (default :data:`FLOAT16_SAFE_MAX`).

    Returns:
        ``features`` as float16 (every value finite).

    Raises:
        FeatureRangeError: A value is NaN/inf or ``|value| > max_abs``; the message gives the count and
            maximum and says to recalibrate BatchNorm (``prepare_backbone(..., calibration_tiles=...)``).
    """
    arr = np.asarray(features)
    finite = np.isfinite(arr)
    if not finite.all():
        raise FeatureRangeError(
            f"{int((~finite).sum())} of {arr.size} feature values are NaN or inf; the backbone is unstable "
            "(recalibrate BatchNorm with prepare_backbone(..., calibration_tiles=...))"
        )
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    if peak > max_abs:
        raise FeatureRangeError(
            f"feature magnitude {peak:.3g} exceeds {max_abs:g} and would overflow float16 (max 65504); "
            "recalibrate BatchNorm on tiles of this cohort (prepare_backbone(..., calibration_tiles=...))"
        )
    return arr.astype(np.float16)


def prepare_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    layer: int,
    calibration_tiles: np.ndarray | Sequence[np.ndarray] | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    recalibrate: bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    scratch: str | Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a backbone ready for :func:`extract_features`, and describe how it was made.

    Args:
        name: A registered model (``"srenet18"``, ``"resnet18"``, ...); must match the checkpoint's arch.
        weights: A checkpoint (``.safetensors`` or its ``.json``; :func:`load_checkpoint`), or None for a
            random initialisation from ``seed`` (the global torch RNG is left untouched).
        layer: Stage 1-4 the features will come from (BatchNorms after it are not recalibrated).
        calibration_tiles: uint8 ``(N, T, T, 3)`` tiles (or a sequence of such batches) of the cohort.
        seed: Seed of the random initialisation.
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``...
        recalibrate: Recalibrate BatchNorm on ``calibration_tiles``; None (default) = only when the
            weights are random.
        model_kwargs: Extra keyword arguments for ``create_model`` (e.g. ``{"width": 8}``).
        scratch: Folder for calibration activations that do not fit in memory
            (:func:`~equislide.models.calibration.recalibrate_batchnorm`); default the system's temp.

    Returns:
        ``(model, info)``: the model in eval mode on ``device``, and a JSON-able dict with ``backbone``,
        ``layer``, ``stride``, ``channels``, ``weights`` (``"sha256:<hex>"`` or ``"random(seed=S)"``),
        ``weights_random``, ``weights_sha256``, ``seed``, ``calibrated``, ``calibration_tiles``
        (count), ``normalisation``, ``model_config`` and ``device``.

    Raises:
        ModelConfigError: Random weights without ``calibration_tiles``, a bad name/layer, or weights of
            another architecture.
        CheckpointError: ``weights`` cannot be loaded.
    """
    dev = resolve_device(device)
    random_weights = weights is None
    if random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(name, **dict(model_kwargs or {}))
        weights_sha = None
        weights_tag = f"random(seed={seed})"
    else:
        model = load_checkpoint(weights)  # type: ignore[arg-type]
        arch = getattr(model, "config", {}).get("arch")
        if arch != name:
            raise ModelConfigError(
                f"weights {weights} hold a {arch!r} model, not {name!r}; pass name={arch!r}"
            )
        wpath = Path(weights)  # type: ignore[arg-type]
        wpath = wpath.with_suffix(".safetensors") if wpath.suffix == ".json" else wpath
        weights_sha = sha256_file(wpath)
        weights_tag = f"sha256:{weights_sha}"
    stride = feature_stride(model, layer)
    do_calibrate = random_weights if recalibrate is None else recalibrate
    n_cal = 0
    if do_calibrate:
        if calibration_tiles is None:
            raise ModelConfigError(
                f"{name} with {'random' if random_weights else 'loaded'} weights needs calibration_tiles "
                "(uint8 (N, T, T, 3) tiles of the cohort) to recalibrate BatchNorm; untrained activations "
                "otherwise overflow float16"
            )
        batches = (
            [calibration_tiles] if isinstance(calibration_tiles, np.ndarray) else list(calibration_tiles)
        )
        model.to(dev)
        inputs = []
        for batch in batches:
            for s in range(0, len(batch), _CALIBRATION_BATCH):
                inputs.append(normalise_tiles(np.asarray(batch[s : s + _CALIBRATION_BATCH]), device=dev))
                n_cal += len(inputs[-1])
        if not inputs:
            raise ModelConfigError("calibration_tiles is empty; pass at least one tile")
        recalibrate_batchnorm(model, inputs, layer=layer, scratch=scratch)
    model.to(dev).eval()
    info: dict[str, Any] = {
        "backbone": getattr(model, "config", {}).get("arch", name),
        "layer": int(layer),
        "stride": stride,
        "channels": int(model.feature_channels[layer - 1]),  # type: ignore[index]
        "weights": weights_tag,
        "weights_random": random_weights,
        "weights_sha256": weights_sha,
        "seed": int(seed),
        "calibrated": bool(do_calibrate),
        "calibration_tiles": n_cal,
        "normalisation": dict(NORMALISATION),
        "model_config": dict(getattr(model, "config", {})),
        "device": str(dev),
    }
    return model, info

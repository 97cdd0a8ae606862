"""BatchNorm recalibration: give an untrained or transferred backbone sane activation scales.

Radial SRE kernels have a large DC gain, so with default BatchNorm statistics (mean 0, var 1) an
untrained SRENet's activations grow by orders of magnitude per stage (~1e7 by layer 4 on real
H&E) and overflow float16 feature stores. Re-estimating each BatchNorm's running statistics on a
few images of the cohort fixes the scale without touching learned weights; it keeps equivariance,
because per-channel means and variances over whole maps are invariant to rotating the images.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Tensor], *, layer: int | None = None
) -> nn.Module:
    """Replace every BatchNorm's running statistics by their average over ``batches``.

    Args:
        model: A backbone (anything with ``features(x, layer)``, or a plain module).
        batches: Image batches ``(N, 3, H, W)`` as the model will see them (same normalisation).
        layer: If given, run only ``model.features(x, layer)``: BatchNorms after that stage keep
            their statistics.

    Returns:
        ``model``, in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    try:
        for x in batches:
            if layer is None:
                model(x)
            else:
                model.features(x, layer)  # type: ignore[operator]
            seen += 1
    finally:
        for m, (momentum, _) in zip(bns, saved, strict=True):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("recalibrate_batchnorm needs at least one batch of images")
    return model

"""Test-time options that make a segmentation more consistent under rotations off 90 degrees.

An exactly D4-equivariant backbone (SRENet) gives identical segmentations at 0/90/180/270 degrees;
at other angles the square grid breaks the symmetry and the label maps drift. Two cheap remedies
that keep the D4 exactness:

* :func:`rotation_averaged_features`: average the features of the input at 0 and 45 degrees (the
  45-degree map is rotated back first). With a D4-equivariant backbone this averages over the
  eight-fold rotations, so the result is closer to equivariant at 22.5-degree steps.
* :func:`smoothed_labels`: blur each cluster's distance map with a small Gaussian (and optionally
  upsample it bilinearly) before taking the nearest centroid, so pixel-level noise near cluster
  boundaries does not flip labels.

Both use only D4-symmetric pieces (rotations about the grid centre, a centred disc, separable
symmetric kernels with replicate padding), so they commute with the square's symmetries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from equislide.models.equivariance import _disc, rotate

__all__ = ["WHITE", "gaussian_blur", "rotation_averaged_features", "smoothed_labels"]

#: White glass (RGB 255) after the project's normalisation ``(rgb / 255 - 0.5) / 0.25``.
WHITE = 2.0

Maps = Tensor | list[Tensor]


def _rotate_filled(x: Tensor, degrees: float, fill: float) -> Tensor:
    # rotate() fills with zeros; shifting by the fill value makes the new corners white glass,
    # as a slide rotated on the scanner would show.
    return rotate(x - fill, degrees) + fill if fill else rotate(x, degrees)


@torch.no_grad()
def rotation_averaged_features(
    fn: Callable[[Tensor], Maps],
    x: Tensor,
    *,
    angles: Sequence[float] = (0.0, 45.0),
    fill: float = WHITE,
) -> Maps:
    """Features averaged over rotated copies of the input, each rotated back first.

    For every angle a, the input is rotated by a (bilinear, ``fill`` in the corners), ``fn`` is
    applied and its maps are rotated by -a (bilinear). Inside the disc inscribed in each map, the
    result is the mean over all angles; outside it (where a rotated copy saw the white corners) it
    is the 0-degree map alone. With ``angles=(0, 45)`` and a D4-equivariant ``fn``, the result is
    D4-equivariant as well (a flip maps the 45-degree copy onto the -45-degree one, which the
    90-degree equivariance makes the same average).

    Args:
        fn: Input ``(N, C, H, W)`` -> one map or a list of maps ``(N, C', h, w)`` with square,
            centred grids (``lambda t: model.features(t, 4)`` or ``model.forward_intermediates``).
        x: Normalised input images ``(N, C, H, W)``, square.
        angles: Counter-clockwise angles in degrees; must include 0.
        fill: Input value for pixels rotated in from outside the frame (default: white glass).

    Returns:
        What ``fn`` returns (a map or a list of maps), averaged. Costs ``len(angles)`` passes.

    Raises:
        ValueError: ``angles`` lacks 0 or ``x`` is not square.
    """
    angles = [float(a) for a in angles]
    if 0.0 not in angles:
        raise ValueError(f"angles={angles!r} must include 0 (the frame the result is in)")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be square, got {tuple(x.shape[-2:])}")
    ref = fn(x)
    single = isinstance(ref, Tensor)
    refs = [ref] if single else list(ref)
    sums = [r.clone() for r in refs]
    for a in angles:
        if a == 0.0:
            continue
        outs = fn(_rotate_filled(x, a, fill))
        outs = [outs] if isinstance(outs, Tensor) else list(outs)
        for s, out in zip(sums, outs, strict=True):
            s.add_(rotate(out, -a))
    n = len(angles)
    result = []
    for r, s in zip(refs, sums, strict=True):
        disc = _disc(r.shape[-2], r.shape[-1], 1.0, r.device)
        result.append(torch.where(disc, s / n, r))
    return result[0] if single else result


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return (g / g.sum()).float()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Isotropic Gaussian blur of ``(N, C, h, w)`` maps, ``sigma`` in pixels, replicate padding.

    The kernel is odd, separable and symmetric, so the blur commutes with every D4 element.
    ``sigma <= 0`` returns ``maps`` unchanged.
    """
    if sigma <= 0:
        return maps
    g = _gaussian_kernel(sigma).to(maps.device, maps.dtype)
    r = g.numel() // 2
    c = maps.shape[1]
    out = F.pad(maps, (r, r, 0, 0), mode="replicate")
    out = F.conv2d(out, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, r, r), mode="replicate")
    return F.conv2d(out, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@torch.no_grad()
def smoothed_labels(
    features: np.ndarray | Tensor,
    centroids: np.ndarray | Tensor,
    *,
    sigma: float = 1.0,
    normalise: bool = True,
    out_size: int | None = None,
) -> np.ndarray | Tensor:
    """Nearest-centroid labels after blurring each cluster's distance map.

    Args:
        features: ``(C, h, w)`` or ``(N, C, h, w)`` feature maps (numpy or torch).
        centroids: ``(k, C)`` centroids (``KMeansModel.centroids``), in the space they were fitted
            in: with ``normalise`` the feature vectors are L2-normalised first, as
            ``KMeansParams(l2_normalise=True)`` does.
        sigma: Gaussian sigma in feature pixels; 0 gives plain nearest-centroid labels.
        normalise: L2-normalise each feature vector before measuring distances.
        out_size: If given, the (blurred) distance maps are upsampled bilinearly to ``out_size``
            pixels per side before the argmin, so labels have sub-feature-pixel boundaries.

    Returns:
        int64 labels ``(h, w)`` / ``(N, h, w)`` (or ``out_size`` per side), numpy for numpy input.
    """
    is_tensor = isinstance(features, Tensor)
    f = features if is_tensor else torch.from_numpy(np.asarray(features))
    squeeze = f.ndim == 3
    f = (f[None] if squeeze else f).float()
    c = torch.as_tensor(np.asarray(centroids) if not isinstance(centroids, Tensor) else centroids)
    c = c.to(f.device, torch.float32)
    if c.ndim != 2 or c.shape[1] != f.shape[1]:
        raise ValueError(f"centroids of shape {tuple(c.shape)} do not match {f.shape[1]} feature channels")
    if normalise:
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # Squared distance up to the per-pixel |f|^2 term, which is the same for every cluster.
    dist = (c * c).sum(1)[None, :, None, None] - 2.0 * torch.einsum("nchw,kc->nkhw", f, c)
    dist = gaussian_blur(dist, sigma)
    if out_size is not None and out_size != dist.shape[-1]:
        dist = F.interpolate(dist, size=(out_size, out_size), mode="bilinear", align_corners=False)
    labels = dist.argmin(1)
    labels = labels[0] if squeeze else labels
    return labels if is_tensor else labels.cpu().numpy()

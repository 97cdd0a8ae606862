"""Checks of rotation equivariance: exact on the square's symmetries, measured off them.

``check_equivariance`` applies each element g of the dihedral group D4 to the input and compares
``f(g x)`` with ``g f(x)``; for SRE-Conv networks the two agree to float rounding.
``rotation_equivariance_error`` does the same for an arbitrary angle, where only approximate
agreement is possible (the grid is square), and reports the relative error inside a central disc
so that corners rotated in from outside the image do not count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "D4_ELEMENTS",
    "apply_d4",
    "check_equivariance",
    "d4_errors",
    "rotate",
    "rotation_equivariance_error",
    "rotation_errors",
]

# Name -> action on the last two (row, col) dims. rot90 is counter-clockwise, as in torch.rot90.
D4_ELEMENTS: dict[str, Callable[[Tensor], Tensor]] = {
    "rot90": lambda t: torch.rot90(t, 1, (-2, -1)),
    "rot180": lambda t: torch.rot90(t, 2, (-2, -1)),
    "rot270": lambda t: torch.rot90(t, 3, (-2, -1)),
    "flip_rows": lambda t: torch.flip(t, (-2,)),
    "flip_cols": lambda t: torch.flip(t, (-1,)),
    "transpose": lambda t: t.transpose(-2, -1),
    "antitranspose": lambda t: torch.rot90(t, 2, (-2, -1)).transpose(-2, -1),
}


def apply_d4(t: Tensor, element: str) -> Tensor:
    """Apply the D4 element ``element`` (a key of :data:`D4_ELEMENTS`) to ``t``'s last two dims."""
    try:
        return D4_ELEMENTS[element](t)
    except KeyError:
        raise ValueError(f"element={element!r} is not one of {', '.join(D4_ELEMENTS)}") from None


@torch.no_grad()
def check_equivariance(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    atol: float,
    rtol: float = 0.0,
    elements: tuple[str, ...] = tuple(D4_ELEMENTS),
) -> dict[str, float]:
    """Compare ``fn(g x)`` with ``g fn(x)`` for every D4 element ``g``.

    Args:
        fn: A map from ``(N, C, H, W)`` to ``(N, C', H', W')`` (a layer, or ``lambda x:
            model.features(x, 3)``). Call ``model.eval()`` first: training-mode BatchNorm is
            equivariant too, but its batch statistics change between the two calls.
        x: Input; for networks with stride s, sides should be multiples of s.
        atol: Absolute tolerance; the largest allowed error is ``atol + rtol * max|fn(x)|``.
        rtol: Tolerance relative to the output's magnitude.
        elements: Which elements of :data:`D4_ELEMENTS` to test.

    Returns:
        The maximum absolute error for each element.

    Raises:
        AssertionError: some element's error exceeds the tolerance (message lists all errors).
    """
    ref = fn(x)
    scale = float(ref.abs().max())
    errors = {}
    for name in elements:
        g = D4_ELEMENTS[name]
        errors[name] = float((fn(g(x)) - g(ref)).abs().max())
    bound = atol + rtol * scale
    bad = {k: v for k, v in errors.items() if not v <= bound}
    if bad:
        detail = ", ".join(f"{k}={v:.3g}" for k, v in errors.items())
        raise AssertionError(f"not equivariant within {bound:.3g} (max |f(x)| = {scale:.3g}): {detail}")
    return errors


def rotate(x: Tensor, degrees: float, *, mode: str = "bilinear") -> Tensor:
    """Rotate ``(N, C, H, W)`` images counter-clockwise about their centre, keeping the size.

    Pixels that come from outside the image are zero. Multiples of 90 degrees on square inputs are
    exact (``torch.rot90``); other angles interpolate with ``mode`` (``"bilinear"`` or ``"nearest"``).
    """
    quarter = degrees / 90.0
    if quarter == round(quarter) and x.shape[-1] == x.shape[-2]:
        return torch.rot90(x, int(round(quarter)) % 4, (-2, -1))
    theta = math.radians(degrees)
    h, w = x.shape[-2:]
    # affine_grid maps output to input coordinates in [-1, 1]; correct for non-square aspect.
    cos, sin = math.cos(theta), math.sin(theta)
    mat = torch.tensor(
        [[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype, device=x.device
    ).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _disc(h: int, w: int, fraction: float, device: torch.device) -> Tensor:
    yy = (torch.arange(h, device=device) + 0.5 - h / 2) / (h / 2)
    xx = (torch.arange(w, device=device) + 0.5 - w / 2) / (w / 2)
    return (yy[:, None] ** 2 + xx[None, :] ** 2) <= fraction**2


@torch.no_grad()
def d4_errors(fn: Callable[[Tensor], list[Tensor]], x: Tensor) -> list[float]:
    """Largest relative D4 equivariance error of each map a multi-output ``fn`` returns.

    ``fn`` returns several maps (e.g. ``model.forward_intermediates``); for each, the result is
    ``max_g max|fn(g x) - g fn(x)| / max|fn(x)|`` over the elements of :data:`D4_ELEMENTS`.
    """
    ref = fn(x)
    errors = [0.0] * len(ref)
    for g in D4_ELEMENTS.values():
        for i, out in enumerate(fn(g(x))):
            err = float((out - g(ref[i])).abs().max() / ref[i].abs().max().clamp_min(1e-30))
            errors[i] = max(errors[i], err)
    return errors


@torch.no_grad()
def rotation_errors(
    fn: Callable[[Tensor], list[Tensor]], x: Tensor, degrees: float, *, disc: float = 0.5
) -> list[float]:
    """:func:`rotation_equivariance_error` for each map a multi-output ``fn`` returns."""
    h, w = x.shape[-2:]
    x = x * _disc(h, w, 1.0, x.device)
    refs = fn(x)
    outs = fn(rotate(x, degrees))
    errors = []
    for out, ref in zip(outs, refs, strict=True):
        ref = rotate(ref, degrees)
        mask = _disc(ref.shape[-2], ref.shape[-1], disc, ref.device)
        if not mask.any():  # a map too small to have an interior: nothing to measure
            errors.append(float("nan"))
            continue
        num = ((out - ref) * mask).pow(2).sum().sqrt()
        den = (ref * mask).pow(2).sum().sqrt().clamp_min(1e-12)
        errors.append(float(num / den))
    return errors


def rotation_equivariance_error(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    degrees: float,
    *,
    disc: float = 0.5,
) -> float:
    """Relative equivariance error of ``fn`` at an arbitrary angle.

    .. math::

        e(\\theta) = \\frac{\\lVert M \\odot (f(R_\\theta x) - R_\\theta f(x)) \\rVert_2}
                          {\\lVert M \\odot R_\\theta f(x) \\rVert_2}

    where :math:`M` is a centred disc of radius ``disc`` (as a fraction of the half-side) on the
    feature map, away from the borders where rotation brings in padding. The input is masked to the
    inscribed disc first, so that both sides see the same tissue.

    Returns:
        ``e`` as a float (0 = perfectly equivariant; about 1 or more = unrelated maps).
    """
    return rotation_errors(lambda t: [fn(t)], x, degrees, disc=disc)[0]

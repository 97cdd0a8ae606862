"""Which resolution (µm per level-0 pixel) a slide is read at, and why: :func:`resolve_mpp`.

The rules (README, "Inputs and resolution"):

- Metadata mpp is *usable* when both axes are finite, parse as numbers, lie in
  :data:`MPP_RANGE` (0.05-20 µm/px: a 100x objective to a 0.5x overview), agree within
  :data:`MAX_ANISOTROPY`, put the image within :data:`MAX_EXTENT_MM` of glass on either side, and,
  where the file states an objective power, lie within :data:`OBJECTIVE_FACTOR` of ``10 / power``
  (40x ~ 0.25, 20x ~ 0.5 µm/px). Anything else is *unusable*: a default (72 dpi = 353 µm/px), a unit
  mix-up (MPP 40 on a 20x slide) or garbage (nan, 0, 1e-300, "abc").
- ``input_mpp`` fills in only where the metadata is absent or unusable; where it contradicts usable
  metadata (beyond :data:`AGREE_FACTOR`) the metadata wins and a warning says so.
- ``force_mpp`` replaces the metadata whatever it says (a warning when they disagree).
- No usable mpp and neither given: :attr:`MppChoice.mpp` is ``None`` and :attr:`MppChoice.problem`
  says why in words; :func:`~equislide.tiling.plan_samples` refuses such a slide unless asked to
  process it at native pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "AGREE_FACTOR",
    "MAX_ANISOTROPY",
    "MAX_EXTENT_MM",
    "MPP_RANGE",
    "OBJECTIVE_FACTOR",
    "MppChoice",
    "check_user_mpp",
    "resolve_mpp",
]

#: Plausible microscope resolutions, µm per pixel (100x oil ~0.06, a 0.5x overview ~20).
MPP_RANGE = (0.05, 20.0)
#: x and y resolutions further apart than this are a broken header, not square-ish pixels.
MAX_ANISOTROPY = 1.5
#: A slide image wider or taller than this (mm) at its stated mpp is not of one glass slide
#: (75 x 25 mm, 75 x 50 mm for large-format), so its mpp is wrong.
MAX_EXTENT_MM = 100.0
#: Metadata mpp further than this factor from 10 / objective power contradicts the objective.
OBJECTIVE_FACTOR = 2.0
#: A given mpp within this factor of the metadata's agrees with it (scanners round 0.2527 to 0.25).
AGREE_FACTOR = 1.05

#: mpp_source values: where :attr:`MppChoice.mpp` came from.
SOURCE_METADATA, SOURCE_INPUT, SOURCE_FORCED = "metadata", "input_mpp", "override"


@dataclass(frozen=True)
class MppChoice:
    """The resolution a slide is read at.

    Attributes:
        mpp: (x, y) µm per level-0 pixel, or ``None`` (no usable resolution).
        source: ``"metadata"``, ``"input_mpp"`` (filled in), ``"override"`` (forced) or ``None``.
        metadata_mpp: The file's own mpp when usable, else ``None``.
        problem: Why the metadata gives no usable mpp (``None`` when it does).
        warnings: One-line warnings (a contradiction, a forced value, unusable metadata filled in).
    """

    mpp: tuple[float, float] | None
    source: str | None
    metadata_mpp: tuple[float, float] | None
    problem: str | None
    warnings: tuple[str, ...] = ()


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def check_user_mpp(value: float, name: str) -> str | None:
    """Why a user-given mpp (``--input-mpp``, ``--force-mpp``) is unusable, or ``None``."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        return f"{name} {value!r} must be a positive number of µm per pixel"
    lo, hi = MPP_RANGE
    if not lo <= value <= hi:
        return f"{name} {_fmt(value)} is outside the plausible {lo}-{hi} µm per pixel"
    return None


def metadata_problem(
    raw: tuple[float, float] | str | None,
    *,
    dimensions: tuple[int, int],
    objective_power: float | None = None,
) -> str | None:
    """Why the metadata's ``raw`` mpp is unusable, in words; ``None`` when usable.

    ``raw`` is what a reader found: (x, y) numbers (maybe nan, negative, huge), a string saying
    what could not be parsed, or ``None`` when the file has no resolution at all.
    """
    if raw is None:
        return "no resolution in the metadata"
    if isinstance(raw, str):
        return raw
    x, y = raw
    lo, hi = MPP_RANGE
    for v in (x, y):
        if not math.isfinite(v) or v <= 0:
            return f"metadata mpp {v!r} µm/px is not a positive number"
        if not lo <= v <= hi:
            return f"metadata mpp {_fmt(v)} µm/px is outside the plausible {lo}-{hi} µm/px"
    if max(x, y) / min(x, y) > MAX_ANISOTROPY:
        return f"metadata mpp x {_fmt(x)} and y {_fmt(y)} µm/px differ more than {MAX_ANISOTROPY}x"
    w_mm, h_mm = dimensions[0] * x / 1000.0, dimensions[1] * y / 1000.0
    if max(w_mm, h_mm) > MAX_EXTENT_MM:
        return (
            f"metadata mpp {_fmt(x)} µm/px makes the {dimensions[0]}x{dimensions[1]} px image "
            f"{w_mm:.0f}x{h_mm:.0f} mm, larger than a glass slide ({MAX_EXTENT_MM:.0f} mm)"
        )
    if objective_power is not None and math.isfinite(objective_power) and objective_power > 0:
        expected = 10.0 / objective_power
        ratio = x / expected
        if not 1.0 / OBJECTIVE_FACTOR <= ratio <= OBJECTIVE_FACTOR:
            return (
                f"metadata mpp {_fmt(x)} µm/px contradicts the {_fmt(objective_power)}x objective power "
                f"(~{_fmt(expected)} µm/px expected)"
            )
    return None


def resolve_mpp(
    raw: tuple[float, float] | str | None,
    *,
    dimensions: tuple[int, int],
    objective_power: float | None = None,
    input_mpp: float | None = None,
    force_mpp: float | None = None,
) -> MppChoice:
    """Apply the module's rules to a reader's ``raw`` metadata mpp and the user's values."""
    if input_mpp is not None and force_mpp is not None:
        raise ValueError("give input_mpp (fills in missing metadata) or force_mpp (overrides it), not both")
    problem = metadata_problem(raw, dimensions=dimensions, objective_power=objective_power)
    meta = None if problem is not None else (float(raw[0]), float(raw[1]))  # type: ignore[index]
    if force_mpp is not None:
        forced = (float(force_mpp), float(force_mpp))
        warnings = []
        if meta is not None and _disagree(meta[0], forced[0]):
            warnings.append(f"--force-mpp {_fmt(forced[0])} replaces the metadata's {_fmt(meta[0])} µm/px")
        return MppChoice(forced, SOURCE_FORCED, meta, None, tuple(warnings))
    if meta is not None:
        warnings = []
        if input_mpp is not None and _disagree(meta[0], input_mpp):
            warnings.append(
                f"--input-mpp {_fmt(input_mpp)} contradicts the metadata's {_fmt(meta[0])} µm/px: "
                "the metadata is used (--force-mpp overrides it)"
            )
        return MppChoice(meta, SOURCE_METADATA, meta, None, tuple(warnings))
    if input_mpp is not None:
        filled = (float(input_mpp), float(input_mpp))
        warnings = [] if raw is None else [f"{problem}: --input-mpp {_fmt(input_mpp)} used instead"]
        return MppChoice(filled, SOURCE_INPUT, None, None, tuple(warnings))
    return MppChoice(None, None, None, problem)


def _disagree(a: float, b: float) -> bool:
    return max(a, b) / min(a, b) > AGREE_FACTOR

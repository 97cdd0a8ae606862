"""Errors raised by ``equislide.models``; each message names the bad value and the fix."""

from __future__ import annotations

__all__ = [
    "FeatureRangeError",
    "CheckpointError",
    "DefaultWeightsError",
    "KMeansError",
    "ModelConfigError",
    "OptionalDependencyError",
    "TrainingDataError",
]


class ModelConfigError(ValueError):
    """A model or layer was asked for with an argument it cannot honour."""


class CheckpointError(ValueError):
    """A weights file is missing, foreign, corrupt or does not match its config."""


class KMeansError(ValueError):
    """K-means was given parameters or vectors it cannot cluster (bad shape, non-finite, too few)."""


class OptionalDependencyError(ImportError):
    """A feature needs an extra that is not installed (``pip install 'equislide[EXTRA]'``)."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(
            f"{feature} needs the optional module {module!r}, which is not installed; "
            f"install it with: pip install 'equislide[{extra}]'"
        )
        self.extra = extra


class FeatureRangeError(ValueError):
    """Features are not finite or too large for float16 (an uncalibrated network, usually)."""


class DefaultWeightsError(CheckpointError):
    """The registry of packaged default weights, or a file it names, is missing, malformed or altered."""


class TrainingDataError(ValueError):
    """Training data that cannot be trained on: an empty folder, one class, no tissue, a bad state file."""

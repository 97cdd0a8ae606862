"""Backbones, SRE-Conv and checkpoints: plain PyTorch, usable from a notebook.

Every backbone has ``features(x, layer)`` returning the stage-``layer`` map ``(N, C, H/s, W/s)``.
"""

from __future__ import annotations

from equislide.models._buffers import release as release_buffers
from equislide.models._errors import CheckpointError, KMeansError, ModelConfigError, OptionalDependencyError
from equislide.models._registry import create_model, list_models, register_model
from equislide.models.calibration import recalibrate_batchnorm
from equislide.models.checkpoint import load_checkpoint, save_checkpoint
from equislide.models.e2cnn_resnet import e2cnn_resnet18
from equislide.models.equivariance import (
    D4_ELEMENTS,
    check_equivariance,
    rotation_equivariance_error,
)
from equislide.models.extract import (
    FLOAT16_SAFE_MAX,
    NORMALISATION,
    FeatureRangeError,
    extract_features,
    feature_stride,
    prepare_backbone,
    resolve_precision,
    to_float16,
)
from equislide.models.kmeans import (
    KMeansModel,
    KMeansParams,
    ReservoirSampler,
    StratifiedSampler,
    canonical_order,
    fit_cohort,
    fit_kmeans,
    fit_per_sample,
    l2_normalise,
    masked_vectors,
    resolve_backend,
)
from equislide.models.resnet import resnet18
from equislide.models.sre_conv import SREConv2d, num_rings, ring_basis, ring_index
from equislide.models.srenet import srenet18

__all__ = [
    "FLOAT16_SAFE_MAX",
    "NORMALISATION",
    "FeatureRangeError",
    "extract_features",
    "feature_stride",
    "prepare_backbone",
    "resolve_precision",
    "to_float16",
    "D4_ELEMENTS",
    "CheckpointError",
    "ModelConfigError",
    "KMeansError",
    "KMeansModel",
    "KMeansParams",
    "ReservoirSampler",
    "StratifiedSampler",
    "canonical_order",
    "fit_cohort",
    "fit_kmeans",
    "fit_per_sample",
    "l2_normalise",
    "masked_vectors",
    "resolve_backend",
    "OptionalDependencyError",
    "SREConv2d",
    "check_equivariance",
    "create_model",
    "e2cnn_resnet18",
    "list_models",
    "load_checkpoint",
    "num_rings",
    "recalibrate_batchnorm",
    "release_buffers",
    "register_model",
    "resnet18",
    "ring_basis",
    "ring_index",
    "rotation_equivariance_error",
    "save_checkpoint",
    "srenet18",
]

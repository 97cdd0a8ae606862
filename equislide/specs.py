"""The parameters of a run as frozen dataclasses: each spec holds its defaults once and its resume key.

Every stage (:mod:`equislide.stages`) takes specs, never untyped option dicts, and every done-marker
hashes a spec's :meth:`params` (through :meth:`key`), so a resume key cannot drift from the
parameters that made the result. The CLI reads its defaults from here.

- :class:`TilingSpec`: how a slide becomes tiles (analysis mpp, tile, halo, input mpp, TMA mode).
- :class:`FeatureSpec`: which network makes the features (backbone, layer, weights or seeded random
  initialisation, BatchNorm calibration, device).
- :class:`ClusterSpec`: how the features become clusters (k, cohort or per-sample fit, backend, vectors
  per sample, seed).
- :class:`PretrainSpec`: what ``equislide pretrain`` trains on, how, and where it writes.
- :class:`BackboneRef` and :class:`KMeansRef`: a saved network and a saved K-means model, as the
  backbone and cluster stages return them; later stages take these references, not the objects.

The parameter dicts (and so the hashes) are exactly those of the releases before the specs existed,
so stores and outputs of earlier runs are still recognised as finished.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BACKBONES",
    "BACKBONE_ALIASES",
    "RANDOM_WEIGHTS",
    "BATCH_TILES",
    "CLUSTER_FORMAT",
    "TILING_FORMAT",
    "BackboneRef",
    "ClusterSpec",
    "FeatureSpec",
    "KMeansRef",
    "PretrainSpec",
    "TilingSpec",
]

#: Version tag of the tiling parameters; part of every sample's parameter hash.
TILING_FORMAT = "equislide-tiling/1"
#: Tiles read and written per batch (one shard of the tile store); part of the tiling key.
BATCH_TILES = 32
#: Version tag of the feature / cluster / segment parameters; part of every key they write.
CLUSTER_FORMAT = "equislide-segment/1"
#: Registered backbone names the service runs (``--backbone`` short names map onto them).
BACKBONES = ("srenet18", "resnet18", "e2cnn_resnet18")
#: The CLI's short backbone names.
BACKBONE_ALIASES = {"srenet": "srenet18", "resnet18": "resnet18", "e2cnn": "e2cnn_resnet18"}
#: ``FeatureSpec.weights`` (and ``--weights``) value asking for the seeded random initialisation even
#: where packaged default weights exist.
RANDOM_WEIGHTS = "random"

TmaMode = Literal["auto", "yes", "no"]
FitMode = Literal["cohort", "per-sample"]


def _hash(params: Mapping[str, Any]) -> str:
    from equislide.storage import params_hash

    return params_hash(dict(params))


@dataclass(frozen=True)
class TilingSpec:
    """How a slide becomes tiles.

    Attributes:
        mpp: Analysis resolution, µm per pixel.
        tile: Interior side of a whole-slide tile, analysis pixels (>= 8).
        halo: Context on every side of a whole-slide tile, and the margin around a TMA core, px.
        input_mpp: µm per level-0 pixel filling in where a file has no usable resolution (usable
            metadata wins, with a warning when they disagree).
        force_mpp: µm per level-0 pixel replacing every file's metadata (not with ``input_mpp``).
        tma: ``"auto"`` (dearray when the mask looks like a TMA), ``"yes"`` or ``"no"``.
        native_pixels: Process a file without a usable resolution at native level-0 pixels
            instead of refusing it.
        max_tiles: Refuse a slide planned to more tiles than this.

    Raises:
        ValueError: a bad value (the message names it).
    """

    mpp: float = 2.5
    tile: int = 512
    halo: int = 32
    input_mpp: float | None = None
    tma: TmaMode = "auto"
    force_mpp: float | None = None
    native_pixels: bool = False
    max_tiles: int = 100_000

    def __post_init__(self) -> None:
        if self.tma not in ("auto", "yes", "no"):
            raise ValueError(f"tma={self.tma!r}; use 'auto', 'yes' or 'no'")
        if isinstance(self.tile, bool) or int(self.tile) != self.tile or self.tile < 8:
            raise ValueError(f"tile={self.tile!r} must be an integer >= 8 (analysis pixels)")
        if isinstance(self.halo, bool) or int(self.halo) != self.halo or self.halo < 0:
            raise ValueError(f"halo={self.halo!r} must be an integer >= 0 (analysis pixels)")
        if not (isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp={self.mpp!r} must be a positive number of µm per pixel")
        for name in ("input_mpp", "force_mpp"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"{name}={value!r} must be a positive number of µm per pixel")
        if self.input_mpp is not None and self.force_mpp is not None:
            raise ValueError(
                "give input_mpp (fills in missing metadata) or force_mpp (overrides it), not both"
            )
        if isinstance(self.max_tiles, bool) or int(self.max_tiles) != self.max_tiles or self.max_tiles < 1:
            raise ValueError(f"max_tiles={self.max_tiles!r} must be an integer >= 1")
        object.__setattr__(self, "max_tiles", int(self.max_tiles))
        object.__setattr__(self, "native_pixels", bool(self.native_pixels))
        object.__setattr__(self, "tile", int(self.tile))
        object.__setattr__(self, "halo", int(self.halo))
        object.__setattr__(self, "mpp", float(self.mpp))

    def params(self) -> dict[str, Any]:
        """The parameter dict whose hash decides whether a finished sample can be reused.

        ``force_mpp`` and the fill-in rule of ``input_mpp`` (which overrode the metadata before
        format 1 readers) appear only when set, so the default key is unchanged; ``native_pixels``
        and ``max_tiles`` decide whether a slide is tiled, not what its tiles hold.
        """
        from equislide.tiling import THUMBNAIL_MAX

        extra: dict[str, Any] = {}
        if self.input_mpp is not None:
            extra["input_mpp_rule"] = "fill-in"
        if self.force_mpp is not None:
            extra["force_mpp"] = float(self.force_mpp)
        return {
            **extra,
            "format": TILING_FORMAT,
            "mpp": float(self.mpp),
            "tile": int(self.tile),
            "halo": int(self.halo),
            "input_mpp": None if self.input_mpp is None else float(self.input_mpp),
            "tma": self.tma,
            "thumbnail_max": THUMBNAIL_MAX,
            "batch_tiles": BATCH_TILES,
        }

    def key(self) -> str:
        """Hex SHA-256 of :meth:`params`."""
        return _hash(self.params())


@dataclass(frozen=True)
class FeatureSpec:
    """Which network makes the features, and how.

    Attributes:
        backbone: Registered model name (:data:`BACKBONES`).
        layer: Feature stage 1-4.
        weights: A checkpoint to use as is; None = the backbone's packaged default weights
            (:func:`equislide.models.defaults.packaged_weights`) when the registry makes some the
            default and ``model_kwargs`` agree with them, else seeded random weights with BatchNorm
            recalibrated on the cohort's tiles; :data:`RANDOM_WEIGHTS` (``"random"``) = the latter
            always.
        seed: Seed of the random initialisation.
        model_kwargs: Builder arguments of a random initialisation (e.g. ``{"width": 16}``); any that
            differ from the packaged default's config make a run use random weights instead.
        calibration_tiles: Most tiles BatchNorm is recalibrated on (random weights).
        device: Feature device: ``"auto"`` (CUDA when the worker has one), ``"cpu"``, ``"cuda:0"``...
        batch_tiles: Tiles per forward pass.
        precision: Forward precision: ``"auto"`` (bf16 where the device computes it in hardware, else
            fp32; resolved once by the backbone stage), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (GPU only).
    """

    backbone: str = "srenet18"
    layer: int = 4
    weights: str | None = None
    seed: int = 0
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    calibration_tiles: int = 16
    device: str = "auto"
    batch_tiles: int = 4
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision={self.precision!r}; use 'auto', 'fp32', 'bf16' or 'fp16'")
        if self.layer not in (1, 2, 3, 4):
            raise ValueError(f"layer={self.layer!r} must be 1, 2, 3 or 4")
        if self.calibration_tiles < 1:
            raise ValueError(f"calibration_tiles={self.calibration_tiles} must be >= 1")
        if self.batch_tiles < 1:
            raise ValueError(f"batch_tiles={self.batch_tiles} must be >= 1")
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs or {}))
        object.__setattr__(self, "weights", None if self.weights is None else str(self.weights))


@dataclass(frozen=True)
class ClusterSpec:
    """How features become clusters.

    Attributes:
        k: Clusters.
        fit: ``"cohort"`` (one model for all samples) or ``"per-sample"`` (the paper's protocol).
        backend: K-means backend: ``auto``, ``cuml``, ``torch`` or ``sklearn``.
        per_sample: Most tissue vectors drawn per sample for a fit.
        cohort_vectors: Most vectors of a cohort fit: past it, each sample gives an equal share of its
            draw (a seeded subset; samples with fewer vectors give all of theirs), so the fit's memory
            stops growing with the cohort (1000 samples x 2000 vectors x 512 channels would be 4 GB).
        seed: Seeds the vector draws and K-means.
        fit_native: Pool samples tiled at native pixels (no usable resolution) into a cohort fit;
            by default they are left out of it and labelled by the model of the others.
    """

    k: int = 3
    fit: FitMode = "cohort"
    backend: str = "auto"
    per_sample: int = 2000
    cohort_vectors: int = 100_000
    seed: int = 0
    fit_native: bool = False

    def __post_init__(self) -> None:
        if self.fit not in ("cohort", "per-sample"):
            raise ValueError(f"fit={self.fit!r}; use 'cohort' or 'per-sample'")
        if self.k < 2:
            raise ValueError(f"k={self.k} must be >= 2")
        if self.per_sample < 1:
            raise ValueError(f"per_sample={self.per_sample} must be >= 1")
        if self.cohort_vectors < self.k:
            raise ValueError(f"cohort_vectors={self.cohort_vectors} must be >= k={self.k}")

    def kmeans_params(self):
        """The :class:`~equislide.models.KMeansParams` of every fit of this spec (L2-normalised, CPU)."""
        from equislide.models.kmeans import KMeansParams

        return KMeansParams(
            k=int(self.k), backend=self.backend, seed=int(self.seed), l2_normalise=True, device="cpu"
        )

    def params(self) -> dict[str, Any]:
        """The parameters a per-sample fit is keyed by."""
        return {
            "mode": "per-sample",
            "k": int(self.k),
            "per_sample": int(self.per_sample),
            "backend": self.backend,
            "seed": self.seed,
        }

    def key(self) -> str:
        """Hex SHA-256 of :meth:`params`."""
        return _hash(self.params())


@dataclass(frozen=True)
class BackboneRef:
    """A saved network every feature task loads, and how it was made (the backbone stage's result).

    Attributes:
        path: The ``.safetensors`` checkpoint (a JSON config beside it).
        sha256: Its SHA-256 (checked when a worker loads it).
        backbone: Registered model name.
        layer: Feature stage.
        weights_random: True for a seeded random initialisation (BatchNorm recalibrated).
        provenance: How it was made (seed, calibration tiles) or where it came from; packaged default
            weights have ``"source": "packaged"``, their ``name``, ``sha256`` and ``why``.
        status: ``"given"`` (a file or packaged weights used as they are), ``"written"`` or
            ``"skipped"`` (reused from an earlier run).
        precision: The resolved forward precision every feature task runs at (``"fp32"``, ``"bf16"``,
            ``"fp16"``): one per run, so a cohort's features are all alike.
    """

    path: str
    sha256: str
    backbone: str
    layer: int
    weights_random: bool
    provenance: Mapping[str, Any]
    status: str
    precision: str = "fp32"

    def params(self) -> dict[str, Any]:
        """The parameter dict keying a store's features: network, weights hash, layer, normalisation,
        and the precision unless fp32 (so stores of runs before precisions existed, all fp32, are
        still recognised, and a bf16 run never reuses fp32 features nor the reverse)."""
        from equislide.models.extract import NORMALISATION

        extra = {} if self.precision == "fp32" else {"precision": self.precision}
        return {
            "format": CLUSTER_FORMAT,
            "backbone": self.backbone,
            "weights_sha256": self.sha256,
            "layer": int(self.layer),
            "normalisation": dict(NORMALISATION),
            **extra,
        }

    def source(self) -> str:
        """``"packaged"`` (the package's default weights), ``"random"`` or ``"file"`` (a given file)."""
        if self.provenance.get("source") == "packaged":
            return "packaged"
        return "random" if self.weights_random else "file"

    def key(self) -> str:
        """Hex SHA-256 of :meth:`params`: the features' done-marker key."""
        return _hash(self.params())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, for ``run.json``."""
        return {**dataclasses.asdict(self), "provenance": dict(self.provenance)}


@dataclass(frozen=True)
class KMeansRef:
    """A saved cohort K-means model (the cluster stage's result).

    Attributes:
        path: The ``.safetensors`` centroids (a JSON sidecar beside them).
        sha256: Its SHA-256.
        status: ``"written"`` or ``"skipped"`` (reused).
        backend: The backend that fitted it.
        n_vectors: Vectors it was fitted on.
        samples: Samples they came from.
    """

    path: str
    sha256: str
    status: str
    backend: str | None
    n_vectors: int | None
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, for ``run.json``."""
        return dataclasses.asdict(self)


#: Architectures ``equislide pretrain --arch`` takes, by their short names.
PRETRAIN_ARCHS = {"srenet18": "srenet18", "resnet18": "resnet18", "e2cnn18": "e2cnn_resnet18"}


@dataclass(frozen=True)
class PretrainSpec:
    """What ``equislide pretrain`` trains on, how, and where it writes (:mod:`equislide.stages.pretrain`).

    The recipe fields are those of :class:`equislide.models.training.Recipe` (:meth:`recipe`), with
    its defaults: the SRE-Conv authors' NCT-CRC runs.

    Attributes:
        data: Supervised: one ImageFolder (class folders). Self-supervised: slides, image files,
            folders of them, or tile stores (``*.zarr``) of an earlier run, in any mix.
        out: The weights, ``*.safetensors`` (a ``.json`` config beside it); the per-epoch training
            state goes to ``<out without suffix>.train/``.
        val: A labelled ImageFolder scored after every epoch (rotated accuracy; k-NN accuracy when
            self-supervised).
        resume: Continue from the latest state in the ``.train`` folder.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda:0``...
        mpp: Resolution tissue tiles are cut at from slides, µm per pixel (NCT-CRC's 0.5).
        input_mpp: µm per level-0 pixel of inputs without a usable resolution (else native pixels).
        max_tiles: Most self-supervised tiles kept in memory (evenly spaced over the inputs).
        tissue_fraction: Tiles with less tissue than this (tissue mask) are dropped as glass.
        weights_dtype: ``float32`` or ``float16`` (half the size, for shipping) for the saved weights.
        command: The command line, recorded in the weights' provenance.
    """

    data: tuple[str, ...]
    out: str
    arch: str = "srenet18"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    self_supervised: bool = False
    epochs: int = 50
    batch_size: int = 64
    lr: float = 2e-2
    momentum: float = 0.9
    weight_decay: float = 1e-3
    input_size: int = 224
    rotation_augment: bool = False
    seed: int = 0
    precision: str = "auto"
    val: str | None = None
    resume: bool = False
    device: str = "auto"
    mpp: float = 0.5
    input_mpp: float | None = None
    max_tiles: int = 20000
    tissue_fraction: float = 0.5
    weights_dtype: str = "float32"
    command: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(str(d) for d in self.data))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs or {}))
        object.__setattr__(self, "command", tuple(self.command))
        if not self.data:
            raise ValueError("data is empty: give at least one folder, slide or tile store")
        if not str(self.out).endswith(".safetensors"):
            raise ValueError(f"out={self.out!r} must end in .safetensors")
        if self.arch not in PRETRAIN_ARCHS.values():
            raise ValueError(f"arch={self.arch!r} is not one of {', '.join(PRETRAIN_ARCHS.values())}")
        if self.weights_dtype not in ("float32", "float16"):
            raise ValueError(f"weights_dtype={self.weights_dtype!r}; use 'float32' or 'float16'")
        if not 0.0 <= self.tissue_fraction <= 1.0:
            raise ValueError(f"tissue_fraction={self.tissue_fraction!r} must be within 0-1")
        if self.max_tiles < 1:
            raise ValueError(f"max_tiles={self.max_tiles} must be >= 1")
        if not (isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp={self.mpp!r} must be a positive number of µm per pixel")

    def recipe(self):
        """The :class:`~equislide.models.training.Recipe` of these fields (checked there)."""
        from equislide.models.training import Recipe

        return Recipe(
            arch=self.arch,
            model_kwargs=dict(self.model_kwargs),
            self_supervised=self.self_supervised,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            input_size=self.input_size,
            rotation_augment=self.rotation_augment,
            seed=self.seed,
            precision=self.precision,  # type: ignore[arg-type]
        )

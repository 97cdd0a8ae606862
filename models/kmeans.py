"""K-means on feature vectors: one interface, three backends, canonical label order, safe files.

The segmentation is a K-means cluster map of per-pixel feature vectors. Two fitting modes:

- **per sample** (the paper): :func:`fit_per_sample` draws up to ``n_vectors`` tissue vectors of
  one feature map, L2-normalises them and fits ``k`` clusters for that sample alone;
- **cohort**: :func:`fit_cohort` (or a :class:`StratifiedSampler` / :class:`ReservoirSampler`
  of your own) takes an equal share of vectors from every sample, then one fit serves them all.

Backends (``KMeansParams.backend``):

- ``"torch"``: streaming, CPU or CUDA. Pass 1 fills a reservoir sample (``sample_size``) for
  greedy k-means++ seeding (``n_init`` seedings compete on it); then exact Lloyd passes over all
  vectors, one chunk at a time, when the source can be read again. Memory stays flat in the
  number of vectors: one chunk, the reservoir and ``(k, d)`` sums; the stream is never stacked.
- ``"sklearn"``: ``sklearn.cluster.KMeans``, the reference.
- ``"cuml"``: ``cuml.KMeans`` on one GPU, or ``cuml.dask.cluster.KMeans`` across the GPU
  workers of a ``distributed.Client`` passed as ``client=``.
- ``"auto"``: ``"cuml"`` when cuML imports and a CUDA GPU is visible (``"cuml-dask"`` when a
  client with GPU workers is given), else ``"torch"``; see :func:`resolve_backend`.

sklearn and cuML cluster in memory: a chunk stream given to them is first reduced to a
reservoir sample of ``sample_size`` vectors.

Canonical label order. Every backend's centroids are sorted by one rule, so a label id means the
same centroid whatever backend, run or chunking produced it (see :func:`canonical_order`):

1. by increasing Euclidean norm of the centroid;
2. norms within ``1e-4 x`` the largest centroid norm count as equal; such centroids are ordered
   lexicographically by their coordinates (the first coordinate differing by more than that
   tolerance decides, smaller first);
3. centroids equal under both keys keep their fitted order.

Within one fitted model (the cohort mode) the same tissue therefore gets the same id everywhere.
Models fitted separately (the per-sample mode) share ids only as far as their clusters rank alike
by norm; the rule makes ids reproducible, not semantically matched.

Files: :meth:`KMeansModel.save` writes the centroids as safetensors plus a JSON sidecar (params,
backend, versions, sha256), as :mod:`equislide.models.checkpoint` does; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import safetensors
import torch

from equislide._version import __version__
from equislide.models._errors import CheckpointError, KMeansError
from equislide.models._kmeans_cuml import fit_cuml, fit_cuml_dask, import_cuml
from equislide.models._kmeans_sampling import (
    ReservoirSampler,
    StratifiedSampler,
    l2_normalise,
    masked_vectors,
)
from equislide.models._kmeans_sklearn import fit_sklearn
from equislide.models._kmeans_torch import as_numpy, fit_torch
from equislide.models.checkpoint import load_tensors, read_document, write_document
from equislide.text import one_line

__all__ = [
    "BACKENDS",
    "KMEANS_FORMAT_NAME",
    "KMEANS_FORMAT_VERSION",
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
]

#: Values of ``KMeansParams.backend``.
BACKENDS = ("auto", "cuml", "torch", "sklearn")
KMEANS_FORMAT_NAME = "equislide-kmeans"
KMEANS_FORMAT_VERSION = 1
#: Names the label-order rule in saved files, so a future rule cannot be mistaken for this one.
LABEL_ORDER = "norm-then-lexicographic/1"
_ORDER_RTOL = 1e-4
_METADATA_KEY = "equislide_kmeans"
_TENSOR = "centroids"

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
#: Vectors to fit: an ``(n, d)`` array or tensor, an iterable of ``(n_i, d)`` chunks, or a
#: zero-argument callable returning a fresh iterator of chunks on every call.
VectorSource = Any


@dataclass(frozen=True)
class KMeansParams:
    """Everything that decides a K-means fit; saved with the model.

    Args:
        k: Number of clusters.
        backend: ``"auto"``, ``"cuml"``, ``"torch"`` or ``"sklearn"``.
        seed: Seeds every random draw (reservoir, k-means++, sklearn/cuML ``random_state``).
            Same seed, data and order give identical centroids on the same backend and device.
        max_iter: Most Lloyd iterations (passes over the data for the torch backend).
        tol: Stop when the summed squared centroid shift is at most ``tol`` times the mean
            feature variance (sklearn's rule).
        n_init: k-means++ seedings tried; the lowest inertia wins.
        batch_size: Vectors per chunk when an in-memory array is streamed and when predicting.
        sample_size: Reservoir capacity: the torch backend seeds on it, and in-memory backends
            reduce a chunk stream to it.
        device: Torch backend only: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.
        l2_normalise: Scale every vector to unit length before fitting and before predicting.
    """

    k: int = 3
    backend: str = "auto"
    seed: int = 0
    max_iter: int = 300
    tol: float = 1e-4
    n_init: int = 3
    batch_size: int = 65536
    sample_size: int = 50_000
    device: str = "auto"
    l2_normalise: bool = False

    def __post_init__(self) -> None:
        for name in ("k", "max_iter", "n_init", "batch_size", "sample_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise KMeansError(f"{name}={value!r}; it must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise KMeansError(f"seed={self.seed!r}; it must be a non-negative integer")
        if not isinstance(self.tol, (int, float)) or not math.isfinite(self.tol) or self.tol < 0:
            raise KMeansError(f"tol={self.tol!r}; it must be a finite number >= 0")
        if self.backend not in BACKENDS:
            raise KMeansError(f"backend={self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise KMeansError(f"device={self.device!r}; choose 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not isinstance(self.l2_normalise, bool):
            raise KMeansError(f"l2_normalise={self.l2_normalise!r}; it must be True or False")
        if self.sample_size < self.k:
            raise KMeansError(f"sample_size={self.sample_size} is smaller than k={self.k}")
        # numpy integers pass the checks but not json.dumps: store plain Python numbers.
        for name in ("k", "seed", "max_iter", "n_init", "batch_size", "sample_size"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "tol", float(self.tol))


@dataclass(frozen=True, eq=False)
class KMeansModel:
    """Fitted centroids in canonical order (see the module docstring), and how they were found.

    Attributes:
        centroids: ``(k, d)`` float32 host array; label ``i`` is row ``i``.
        params: The parameters of the fit.
        backend: Backend actually used: ``"torch"``, ``"sklearn"``, ``"cuml"`` or ``"cuml-dask"``.
        device: Where it ran (``"cpu"``, ``"cuda:0"``, ``"gpu"``, ``"dask"``).
        inertia: Sum of squared distances to the nearest centroid (torch: of the last Lloyd
            assignment pass); ``nan`` when the backend does not report it.
        n_iter: Lloyd iterations of the final run (torch: passes over the vectors it fitted).
        n_vectors: Vectors seen in the input.
        n_fit_vectors: Vectors the final Lloyd run used (``< n_vectors`` when fitted on a sample).
        versions: Library versions that produced the fit.
    """

    centroids: np.ndarray
    params: KMeansParams
    backend: str
    device: str
    inertia: float
    n_iter: int
    n_vectors: int
    n_fit_vectors: int
    versions: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"KMeansModel(k={self.k}, n_features={self.n_features}, backend={self.backend!r}, "
            f"device={self.device!r}, n_vectors={self.n_vectors}, inertia={self.inertia:.6g})"
        )

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])

    @property
    def n_features(self) -> int:
        """Length ``d`` of a feature vector."""
        return int(self.centroids.shape[1])

    def predict(self, x: ArrayT, *, batch_size: int | None = None) -> ArrayT:
        """Label of the nearest centroid for each vector or each pixel.

        Args:
            x: ``(n, d)`` vectors, a ``(d, h, w)`` feature map or ``(n_tiles, d, h, w)`` maps;
                numpy (computed on the CPU), a torch tensor or a cupy array (computed on its device,
                cupy handed to torch through DLPack without a host copy). Any float
                dtype; float16 is upcast chunk by chunk.
            batch_size: Vectors per chunk (default ``params.batch_size``): memory beyond the
                input and output stays at about ``batch_size x (d + k)`` floats.

        Returns:
            int64 labels in ``[0, k)``: ``(n,)``, ``(h, w)`` or ``(n_tiles, h, w)``, of the input's
            kind: numpy, a tensor on the input's device, or cupy on the input's GPU.

        Raises:
            KMeansError: the shape is none of the above or ``d`` is not :attr:`n_features`.
        """
        batch = batch_size or self.params.batch_size
        from equislide.arrays import like, to_torch

        t = to_torch(x)  # a cupy batch stays on its GPU (DLPack), numpy stays on the host
        d = self.n_features
        if t.ndim not in (2, 3, 4) or (t.ndim == 2 and t.shape[1] != d) or (t.ndim > 2 and t.shape[-3] != d):
            raise KMeansError(
                f"cannot predict on shape {tuple(t.shape)}: expected (n, {d}) vectors, a ({d}, h, w) "
                f"feature map or ({d}, h, w) maps stacked as (n_tiles, {d}, h, w)"
            )
        centroids = torch.from_numpy(self.centroids).to(t.device)
        c_sq = (centroids * centroids).sum(1)

        def nearest(vectors: torch.Tensor) -> torch.Tensor:
            v = vectors.float()
            if self.params.l2_normalise:
                v = l2_normalise(v)
            return (c_sq[None, :] - 2.0 * (v @ centroids.T)).argmin(1)

        if t.ndim == 2:
            out = torch.empty(t.shape[0], dtype=torch.int64, device=t.device)
            for start in range(0, t.shape[0], batch):
                out[start : start + batch] = nearest(t[start : start + batch])
        else:
            maps = t if t.ndim == 4 else t[None]
            n_tiles, _, h, w = maps.shape
            out = torch.empty((n_tiles, h, w), dtype=torch.int64, device=t.device)
            rows = max(1, batch // max(w, 1))
            for i in range(n_tiles):
                for r in range(0, h, rows):
                    slab = maps[i, :, r : r + rows, :]  # (d, rows, w): only this slab is transposed
                    labels = nearest(slab.permute(1, 2, 0).reshape(-1, d))
                    out[i, r : r + rows] = labels.reshape(slab.shape[1], w)
            if t.ndim == 3:
                out = out[0]
        return like(out, x)

    def save(self, path: str | os.PathLike[str], *, provenance: dict | None = None) -> Path:
        """Write the centroids to ``path`` (``.safetensors``) and a JSON sidecar beside it.

        The sidecar (same path, suffix ``.json``) holds ``format``, ``format_version``, ``params``,
        ``backend``, ``device``, ``inertia``, ``n_iter``, ``n_vectors``, ``n_fit_vectors``,
        ``label_order``, ``versions``, ``provenance``, ``weights`` and the weights' ``sha256``.
        The same document less the last two is embedded in the safetensors metadata.

        Args:
            path: Target; must end in ``.safetensors``. Parents are created, files replaced.
            provenance: JSON-serialisable facts (samples fitted on, layer, date, ...).

        Returns:
            The safetensors path.

        Raises:
            CheckpointError: wrong suffix, or provenance that is not JSON-serialisable.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: a K-means model path must end in '.safetensors'")
        document = {
            "format": KMEANS_FORMAT_NAME,
            "format_version": KMEANS_FORMAT_VERSION,
            "params": dataclasses.asdict(self.params),
            "backend": self.backend,
            "device": self.device,
            "inertia": self.inertia if math.isfinite(self.inertia) else None,
            "n_iter": self.n_iter,
            "n_vectors": self.n_vectors,
            "n_fit_vectors": self.n_fit_vectors,
            "label_order": LABEL_ORDER,
            "tensors": {_TENSOR: {"dtype": "float32", "shape": list(self.centroids.shape)}},
            "versions": dict(self.versions),
            "provenance": dict(provenance or {}),
        }
        tensors = {_TENSOR: torch.from_numpy(np.ascontiguousarray(self.centroids, dtype=np.float32))}
        return write_document(path, tensors, key=_METADATA_KEY, document=document, what="provenance")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KMeansModel:
        """Read a model written by :meth:`save`, exactly (bit-identical centroids).

        Args:
            path: The ``.safetensors`` file or its ``.json`` sidecar. Without the sidecar the
                embedded document is used and no checksum is checked.

        Raises:
            CheckpointError: missing, empty, truncated, not safetensors (a pickle, say), foreign
                (a network checkpoint or another tool's file), failing its checksum, or with
                centroids that do not match the recorded parameters.
        """
        document, weights_path = read_document(
            path, key=_METADATA_KEY, check=_check_kmeans_document, kind="equislide K-means document",
            writer="KMeansModel.save",
        )
        try:
            params = KMeansParams(**document["params"])
        except (TypeError, KMeansError) as err:
            raise CheckpointError(f"{path}: bad 'params' in the K-means document: {one_line(err)}") from None
        tensors = load_tensors(weights_path)
        centroids = tensors.get(_TENSOR)
        if set(tensors) != {_TENSOR} or centroids is None:
            raise CheckpointError(f"{weights_path}: expected one tensor {_TENSOR!r}, found {sorted(tensors)}")
        if centroids.dtype != torch.float32 or centroids.ndim != 2 or centroids.shape[0] != params.k:
            raise CheckpointError(
                f"{weights_path}: centroids are {str(centroids.dtype).removeprefix('torch.')} "
                f"{list(centroids.shape)}; expected float32 [{params.k}, d] for k={params.k}"
            )
        inertia = document.get("inertia")
        return cls(
            centroids=centroids.numpy(),
            params=params,
            backend=str(document.get("backend")),
            device=str(document.get("device")),
            inertia=math.nan if inertia is None else float(inertia),
            n_iter=int(document.get("n_iter", 0)),
            n_vectors=int(document.get("n_vectors", 0)),
            n_fit_vectors=int(document.get("n_fit_vectors", 0)),
            versions=dict(document.get("versions", {})),
        )


def _check_kmeans_document(document: Any, source: Path) -> None:
    fmt = document.get("format") if isinstance(document, dict) else None
    if fmt == "equislide-checkpoint":
        raise CheckpointError(
            f"{source}: is a network checkpoint, not K-means centroids; load it with load_checkpoint"
        )
    if fmt != KMEANS_FORMAT_NAME:
        raise CheckpointError(f"{source}: not an {KMEANS_FORMAT_NAME} document (format is {fmt!r})")
    version = document.get("format_version")
    if not isinstance(version, int) or version > KMEANS_FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: format_version {version!r} is not supported (this equislide reads up to "
            f"{KMEANS_FORMAT_VERSION}); upgrade equislide"
        )
    if document.get("label_order") != LABEL_ORDER:
        raise CheckpointError(
            f"{source}: label order {document.get('label_order')!r} is not {LABEL_ORDER!r}; its labels "
            "would not match this equislide's"
        )
    if not isinstance(document.get("params"), dict):
        raise CheckpointError(f"{source}: K-means document has no 'params' object")


def canonical_order(centroids: np.ndarray) -> np.ndarray:
    """The permutation that puts ``centroids`` in canonical label order (module docstring).

    Args:
        centroids: ``(k, d)`` array.

    Returns:
        int64 ``order`` such that ``centroids[order]`` is canonical.
    """
    c = np.asarray(centroids, dtype=np.float64)
    norms = np.linalg.norm(c, axis=1)
    atol = _ORDER_RTOL * float(norms.max(initial=0.0))

    def compare(i: int, j: int) -> int:
        if abs(norms[i] - norms[j]) > atol:
            return -1 if norms[i] < norms[j] else 1
        for a, b in zip(c[i], c[j], strict=True):
            if abs(a - b) > atol:
                return -1 if a < b else 1
        return -1 if i < j else (1 if i > j else 0)

    return np.array(sorted(range(len(c)), key=functools.cmp_to_key(compare)), dtype=np.int64)


def resolve_backend(backend: str = "auto", *, client: Any = None) -> str:
    """The backend a fit would use: ``"torch"``, ``"sklearn"``, ``"cuml"`` or ``"cuml-dask"``.

    ``"auto"`` gives ``"cuml-dask"`` when cuML imports and ``client`` has at least one worker
    declaring a ``GPU`` resource, ``"cuml"`` when cuML imports and ``torch.cuda.is_available()``,
    and ``"torch"`` otherwise; it never picks cuML without a GPU. ``"cuml"`` with a client gives
    ``"cuml-dask"``.

    Raises:
        KMeansError: unknown ``backend``.
    """
    if backend not in BACKENDS:
        raise KMeansError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "cuml":
        return "cuml-dask" if client is not None else "cuml"
    if backend != "auto":
        return backend
    if importlib.util.find_spec("cuml") is not None:
        if client is not None and _gpu_workers(client) > 0:
            return "cuml-dask"
        if torch.cuda.is_available():
            return "cuml"
    return "torch"


def _gpu_workers(client: Any) -> int:
    try:
        workers = client.scheduler_info()["workers"].values()
        return sum(1 for w in workers if (w.get("resources") or {}).get("GPU", 0) >= 1)
    except Exception:  # a client that cannot answer is treated as having no GPU workers
        return 0


def fit_kmeans(
    vectors: VectorSource, *, params: KMeansParams | None = None, client: Any = None
) -> KMeansModel:
    """Fit K-means to feature vectors.

    Args:
        vectors: One of

            - an ``(n, d)`` numpy array or torch tensor (streamed in ``batch_size`` chunks by the
              torch backend);
            - a zero-argument callable returning a fresh iterator of ``(n_i, d)`` chunks on every
              call (say, reading feature stores one tile at a time): the torch backend makes
              exact Lloyd passes over it, calling it once per pass, and must get the same
              vectors each time;
            - a re-iterable of chunks (a list): likewise;
            - a one-shot iterator (a generator): read once; the torch backend fits on its
              reservoir sample of ``sample_size`` vectors.

            Chunks may be float16; non-finite values are refused.
        params: The fit's parameters (default ``KMeansParams()``).
        client: A ``distributed.Client``; with ``backend="cuml"`` (or ``"auto"`` and GPU workers)
            the fit runs on ``cuml.dask.cluster.KMeans`` across its workers. An ``(n, d)`` dask
            array of vectors is accepted too. This path needs cuML and GPUs and is not covered
            by the test suite (no GPU where it runs).

    Returns:
        The model, centroids in canonical order.

    Raises:
        KMeansError: bad shapes, non-finite values, fewer vectors than ``k``, CUDA asked for
            but not available.
        OptionalDependencyError: ``backend="cuml"`` without cuML installed.
    """
    params = params or KMeansParams()
    backend = resolve_backend(params.backend, client=client)
    if backend == "torch":
        fitted = _fit_torch(vectors, params)
    elif backend == "sklearn":
        fitted = _fit_sklearn(vectors, params)
    elif backend == "cuml":
        fitted = _fit_cuml(vectors, params)
    else:
        fitted = _fit_cuml_dask(vectors, params, client)
    centroids = np.ascontiguousarray(fitted["centroids"], dtype=np.float32)
    if centroids.shape[0] != params.k or not np.isfinite(centroids).all():
        raise KMeansError(
            f"the {backend} backend returned centroids of shape {centroids.shape} with "
            f"{int((~np.isfinite(centroids)).sum())} non-finite values; expected k={params.k} finite rows"
        )
    fitted["centroids"] = centroids[canonical_order(centroids)]
    return KMeansModel(params=params, backend=backend, **fitted)


def fit_per_sample(
    feature_map: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    *,
    k: int = 3,
    n_vectors: int = 2000,
    seed: int = 0,
    backend: str = "auto",
    device: str = "auto",
    normalise: bool = True,
) -> KMeansModel:
    """The paper's mode: fit one sample on up to ``n_vectors`` of its tissue vectors.

    Args:
        feature_map: ``(C, h, w)`` or ``(n_tiles, C, h, w)`` features of one sample (at 0 degrees).
        mask: Boolean tissue mask at feature resolution (``(h, w)`` or ``(n_tiles, h, w)``);
            ``None`` uses every pixel.
        k: Clusters.
        n_vectors: Most vectors drawn (uniformly without replacement, seeded) from the masked pixels.
        seed: Seeds the draw and the fit.
        backend: As in :class:`KMeansParams`.
        device: As in :class:`KMeansParams`.
        normalise: L2-normalise vectors (the model then normalises when predicting too).

    Returns:
        The model; ``model.predict(feature_map)`` gives the sample's label map.
    """
    if n_vectors < 1:
        raise KMeansError(f"n_vectors={n_vectors!r}; it must be a positive integer")
    vectors = masked_vectors(feature_map, mask)
    n = vectors.shape[0]
    if n > n_vectors:
        picked = np.sort(np.random.default_rng(seed).choice(n, size=n_vectors, replace=False))
        vectors = (
            vectors[torch.from_numpy(picked).to(vectors.device)]
            if isinstance(vectors, torch.Tensor)
            else vectors[picked]
        )
    params = KMeansParams(k=k, seed=seed, backend=backend, device=device, l2_normalise=normalise)
    return fit_kmeans(vectors, params=params)


def fit_cohort(
    samples: Iterable[tuple[str, np.ndarray | torch.Tensor, np.ndarray | torch.Tensor | None]],
    *,
    per_sample: int = 2000,
    params: KMeansParams | None = None,
    client: Any = None,
) -> KMeansModel:
    """The cohort mode: one fit on an equal share of tissue vectors from every sample.

    Args:
        samples: ``(sample_id, feature_map, mask)`` triples as :func:`masked_vectors` takes them;
            a sample may appear in several triples (one per tile batch, say).
        per_sample: Most vectors kept per sample (a :class:`StratifiedSampler`, seeded with
            ``params.seed``).
        params: Fit parameters; default ``KMeansParams(l2_normalise=True)``.
        client: As in :func:`fit_kmeans`.
    """
    params = params or KMeansParams(l2_normalise=True)
    sampler = StratifiedSampler(per_sample, seed=params.seed)
    for sample_id, feature_map, mask in samples:
        sampler.add(sample_id, masked_vectors(feature_map, mask))
    return fit_kmeans(sampler.sample, params=params, client=client)


# --- sources and backends ---------------------------------------------------------------------


def _versions(**extra: str) -> dict[str, str]:
    return {
        "equislide": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        **extra,
    }


def _prepare(chunk: Any, params: KMeansParams, n_features: list[int]) -> torch.Tensor:
    """Validate one chunk and return it as float32 (normalised if asked), on its own device."""
    t = chunk if isinstance(chunk, torch.Tensor) else torch.as_tensor(np.asarray(chunk))
    if t.ndim != 2:
        raise KMeansError(f"vectors must be (n, d); got a chunk of shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise KMeansError(f"vectors must be real numbers; got dtype {t.dtype}")
    if not n_features:
        n_features.append(t.shape[1])
    elif t.shape[1] != n_features[0]:
        raise KMeansError(f"a chunk has {t.shape[1]} features but the first had {n_features[0]}")
    t = t.detach().float()
    # Every element is finite when the float32 sum is (no (n, d) boolean temporary; a float64 sum
    # runs ~30x slower on the CPU and this check runs on every Lloyd pass). A sum that is not finite
    # may be an overflow of finite values: only then is every element looked at.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise KMeansError(
            "vectors contain NaN or inf (float16 features overflow above 65504: normalise or "
            "recalibrate the backbone before storing them)"
        )
    return l2_normalise(t) if params.l2_normalise else t


def _source(vectors: VectorSource, params: KMeansParams) -> tuple[Callable[[], Iterator[Any]], bool]:
    """(a callable giving one pass of raw chunks, whether it may be called again)."""
    if isinstance(vectors, (np.ndarray, torch.Tensor)):
        if vectors.ndim != 2:
            raise KMeansError(
                f"vectors must be (n, d); got shape {tuple(vectors.shape)} (use masked_vectors for a "
                "feature map)"
            )
        step = params.batch_size
        return (lambda: (vectors[i : i + step] for i in range(0, vectors.shape[0], step))), True
    if callable(vectors):
        return (lambda: iter(vectors())), True
    if isinstance(vectors, Iterable):
        if iter(vectors) is vectors:
            used = []

            def once() -> Iterator[Any]:
                if used:
                    raise KMeansError("a one-shot iterator of chunks cannot be read twice")
                used.append(True)
                return vectors

            return once, False
        return (lambda: iter(vectors)), True
    raise KMeansError(
        f"cannot fit on a {type(vectors).__name__}; give an (n, d) array, chunks, or a callable"
    )


def _torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KMeansError(f"device={name!r} but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return torch.device(name)


def _fit_torch(vectors: VectorSource, params: KMeansParams) -> dict[str, Any]:
    device = _torch_device(params.device)
    raw_pass, reiterable = _source(vectors, params)
    n_features: list[int] = []

    def one_pass() -> Iterator[torch.Tensor]:
        for chunk in raw_pass():
            yield _prepare(chunk, params, n_features)
            del chunk  # hold no reference to a chunk once the engine has moved on

    fitted = fit_torch(
        one_pass,
        reiterable=reiterable,
        k=params.k,
        seed=params.seed,
        max_iter=params.max_iter,
        tol=params.tol,
        n_init=params.n_init,
        sample_size=params.sample_size,
        device=device,
        to_device=lambda t: t.to(device),
    )
    return {
        "centroids": as_numpy(fitted.centroids),
        "device": str(fitted.centroids.device),
        "inertia": fitted.inertia,
        "n_iter": fitted.n_iter,
        "n_vectors": fitted.n_vectors,
        "n_fit_vectors": fitted.n_fit_vectors,
        "versions": _versions(),
    }


def _in_memory(vectors: VectorSource, params: KMeansParams) -> tuple[np.ndarray, int]:
    """(float32 host array to fit, vectors seen): the array itself, or a stream's reservoir sample."""
    n_features: list[int] = []
    if isinstance(vectors, (np.ndarray, torch.Tensor)):
        x = _prepare(vectors, params, n_features).cpu().numpy()
        return x, x.shape[0]
    raw_pass, _ = _source(vectors, params)
    reservoir = ReservoirSampler(params.sample_size, seed=params.seed)
    for chunk in raw_pass():
        reservoir.add(_prepare(chunk, params, n_features))
    return reservoir.sample, reservoir.n_seen


def _check_enough(n: int, params: KMeansParams) -> None:
    if n < params.k:
        raise KMeansError(f"only {n} vectors to cluster into k={params.k}; give at least k vectors")


def _counted(fitted: dict[str, Any], n_seen: int, n_fit: int) -> dict[str, Any]:
    """An in-memory backend's result with the vector counts and every version it ran with."""
    versions = _versions(**fitted["versions"])
    return {**fitted, "n_vectors": n_seen, "n_fit_vectors": n_fit, "versions": versions}


def _fit_sklearn(vectors: VectorSource, params: KMeansParams) -> dict[str, Any]:
    x, n_seen = _in_memory(vectors, params)
    _check_enough(x.shape[0], params)
    fitted = fit_sklearn(x, params)
    return _counted(fitted, n_seen, x.shape[0])


def _fit_cuml(vectors: VectorSource, params: KMeansParams) -> dict[str, Any]:
    import_cuml()  # the missing extra is named before any vector is read
    x, n_seen = _in_memory(vectors, params)
    _check_enough(x.shape[0], params)
    fitted = fit_cuml(x, params)
    return _counted(fitted, n_seen, x.shape[0])


def _fit_cuml_dask(vectors: VectorSource, params: KMeansParams, client: Any) -> dict[str, Any]:
    """Multi-GPU fit with ``cuml.dask.cluster.KMeans``; untested here (needs GPU workers)."""
    import dask.array as da

    import_cuml()
    if hasattr(vectors, "map_blocks") and hasattr(vectors, "chunks"):  # a dask array of vectors
        if vectors.ndim != 2:
            raise KMeansError(f"vectors must be (n, d); got a dask array of shape {vectors.shape}")
        x = vectors.rechunk({1: -1}).astype(np.float32)
        if params.l2_normalise:
            x = x.map_blocks(l2_normalise, dtype=np.float32)
        n_seen = int(x.shape[0])
    else:
        host, n_seen = _in_memory(vectors, params)
        x = da.from_array(host, chunks=(params.batch_size, -1))
    _check_enough(n_seen, params)
    fitted = fit_cuml_dask(x, params, client)
    return _counted(fitted, n_seen, n_seen)

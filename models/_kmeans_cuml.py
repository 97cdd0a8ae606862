"""The RAPIDS cuML K-means backends: one GPU (``cuml.KMeans``) and several (``cuml.dask``).

Imported lazily: cuML is an optional extra (``pip install 'equislide[cuml]'``, ~3.6 GB of wheels) that
no CPU machine has; :func:`import_cuml` names the extra when it is missing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from equislide.models._errors import OptionalDependencyError

__all__ = ["fit_cuml", "fit_cuml_dask", "import_cuml"]


def import_cuml() -> Any:
    """The ``cuml`` module, or :class:`OptionalDependencyError` naming the extra to install."""
    try:
        import cuml
    except ImportError:
        raise OptionalDependencyError("cuML K-means", "cuml", "cuml") from None
    return cuml


def _host(array: Any) -> np.ndarray:
    """A cuML attribute (CuPy, cuDF or numpy) as a host array."""
    if hasattr(array, "to_numpy"):
        return np.asarray(array.to_numpy())
    if hasattr(array, "get") and not isinstance(array, np.ndarray):
        return np.asarray(array.get())
    return np.asarray(array)


def _result(km: Any, device: str, cuml: Any) -> dict[str, Any]:
    inertia = getattr(km, "inertia_", None)
    return {
        "centroids": _host(km.cluster_centers_),
        "device": device,
        "inertia": float(inertia) if inertia is not None else math.nan,
        "n_iter": int(getattr(km, "n_iter_", 0) or 0),
        "versions": {"cuml": cuml.__version__},
    }


def fit_cuml(x: np.ndarray, params: Any) -> dict[str, Any]:
    """Fit ``cuml.KMeans`` (scalable k-means++) on prepared float32 host vectors ``x``, on one GPU."""
    cuml = import_cuml()
    km = cuml.KMeans(
        n_clusters=params.k,
        max_iter=params.max_iter,
        tol=params.tol,
        random_state=params.seed,
        init="scalable-k-means++",
        n_init=params.n_init,
        output_type="numpy",
    ).fit(x)
    return _result(km, "gpu", cuml)


def fit_cuml_dask(x: Any, params: Any, client: Any) -> dict[str, Any]:
    """Fit ``cuml.dask.cluster.KMeans`` on a float32 dask array ``x`` over the client's GPU workers."""
    cuml = import_cuml()
    import cupy
    from cuml.dask.cluster import KMeans as DaskKMeans

    # cuML's multi-GPU estimator takes CuPy-backed dask arrays; blocks move to each worker's GPU.
    x = x.map_blocks(cupy.asarray, dtype=np.float32)
    km = DaskKMeans(
        client=client,
        n_clusters=params.k,
        max_iter=params.max_iter,
        tol=params.tol,
        random_state=params.seed,
        init="scalable-k-means++",
        n_init=params.n_init,
    ).fit(x)
    return _result(km, "dask", cuml)

"""The scikit-learn K-means backend (the reference): Lloyd with k-means++ on an in-memory array."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["fit_sklearn"]


def fit_sklearn(x: np.ndarray, params: Any) -> dict[str, Any]:
    """Fit ``sklearn.cluster.KMeans`` on prepared float32 vectors ``x`` with :class:`KMeansParams`.

    Returns:
        ``{"centroids", "device", "inertia", "n_iter", "versions"}``.
    """
    import sklearn
    from sklearn.cluster import KMeans

    km = KMeans(
        n_clusters=params.k,
        init="k-means++",
        n_init=params.n_init,
        max_iter=params.max_iter,
        tol=params.tol,
        random_state=params.seed,
        algorithm="lloyd",
    ).fit(x)
    return {
        "centroids": km.cluster_centers_,
        "device": "cpu",
        "inertia": float(km.inertia_),
        "n_iter": int(km.n_iter_),
        "versions": {"sklearn": sklearn.__version__},
    }

"""Benchmark: K-means fit + predict per backend, against scikit-learn measured in the same run.

Baseline: plain ``sklearn.cluster.KMeans(...).fit(x)`` then ``.predict(x)``. Rows: equislide's
``fit_kmeans`` with the sklearn backend (wrapper overhead), the torch backend on the CPU, and, when
a GPU is present, torch on CUDA and cuML. Every row uses the same seed, ``n_init`` and ``tol``;
``predict`` of equislide rows is ``KMeansModel.predict`` (chunked torch). Prints seconds, the
speed-up over the baseline (``x`` > 1 is faster) and the adjusted Rand index of each row's labels
against the baseline's.

    python bench/kmeans.py                      # 200k x 512 float32, k = 3 and 8
    python bench/kmeans.py --n 50000 --k 3      # quicker
    python bench/kmeans.py --threads 1          # on a shared, loaded machine
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from equislide.models import KMeansParams, fit_kmeans


def make_data(n: int, d: int, n_groups: int, seed: int) -> np.ndarray:
    """Feature-like vectors: ``n_groups`` Gaussian groups of unequal size and spread, non-negative."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, size=(n_groups, d)).astype(np.float32)
    weights = rng.dirichlet(np.full(n_groups, 2.0))
    labels = rng.choice(n_groups, size=n, p=weights)
    spread = rng.uniform(0.5, 1.5, size=n_groups).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 20000):  # in blocks: a float64 (n, d) temporary would double memory
        stop = min(n, start + 20000)
        lab = labels[start:stop]
        noise = rng.standard_normal((stop - start, d), dtype=np.float32) * spread[lab, None]
        x[start:stop] = np.maximum(centres[lab] + noise, 0.0)
    return x


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(x: np.ndarray, k: int, n_init: int, seed: int) -> None:
    print(f"\nk = {k}, x = {x.shape[0]} x {x.shape[1]} float32, n_init = {n_init}")
    sk, fit_base = timed(
        lambda: KMeans(n_clusters=k, n_init=n_init, random_state=seed, algorithm="lloyd").fit(x)
    )
    base_labels, pred_base = timed(lambda: sk.predict(x))
    total_base = fit_base + pred_base
    print(f"{'row':24s}{'fit s':>9s}{'predict s':>11s}{'total s':>9s}{'x base':>8s}{'iters':>7s}{'ARI':>7s}")
    print(
        f"{'sklearn (baseline)':24s}{fit_base:9.2f}{pred_base:11.2f}{total_base:9.2f}{1.0:8.2f}"
        f"{sk.n_iter_:7d}{1.0:7.3f}"
    )
    rows = [("equislide sklearn", "sklearn", "cpu"), ("equislide torch cpu", "torch", "cpu")]
    if torch.cuda.is_available():
        rows.append(("equislide torch cuda", "torch", "cuda"))
        if importlib.util.find_spec("cuml") is not None:
            rows.append(("equislide cuml", "cuml", "cuda"))
    for name, backend, device in rows:
        params = KMeansParams(k=k, backend=backend, device=device, seed=seed, n_init=n_init)
        if device == "cuda":  # warm-up: CUDA context, cuBLAS handles
            fit_kmeans(x[:20000], params=params)
        model, fit_s = timed(lambda params=params: fit_kmeans(x, params=params))
        labels, pred_s = timed(lambda model=model: model.predict(x))
        total = fit_s + pred_s
        ari = adjusted_rand_score(base_labels, labels)
        print(
            f"{name:24s}{fit_s:9.2f}{pred_s:11.2f}{total:9.2f}{total_base / total:8.2f}"
            f"{model.n_iter:7d}{ari:7.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--groups", type=int, default=6, help="true groups in the synthetic data")
    parser.add_argument("--n-init", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and sklearn")
    args = parser.parse_args()
    if args.threads:
        # One limit for both: on a loaded machine spare OpenMP threads spin and distort the ratio.
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda: {torch.cuda.is_available()}")
    x = make_data(args.n, args.d, args.groups, args.seed)
    for k in args.k:
        run(x, k, args.n_init, args.seed)


if __name__ == "__main__":
    main()

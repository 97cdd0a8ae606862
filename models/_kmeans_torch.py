"""The streaming torch K-means engine: greedy k-means++ on a reservoir sample, then chunked Lloyd.

Memory is flat in the number of vectors: one chunk, the reservoir and ``(k, d)`` accumulators.
Per-cluster sums are ``index_add_`` on the CPU (rows added in index order) but one-hot matrix
products on CUDA, because CUDA's ``index_add_`` adds with atomics in no fixed order, which would break
"same seed, same centroids".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from equislide.models._errors import KMeansError
from equislide.models._kmeans_sampling import ReservoirSampler

__all__ = ["TorchFit", "fit_torch", "kmeans_plus_plus", "lloyd"]

#: A zero-argument callable giving one pass over the data as float32 ``(n, d)`` chunks on the device.
ChunkPass = Callable[[], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class TorchFit:
    """What the torch engine found (centroids not yet in canonical order)."""

    centroids: torch.Tensor
    inertia: float
    n_iter: int
    n_vectors: int
    n_fit_vectors: int


def kmeans_plus_plus(x: torch.Tensor, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with sklearn's local trials).

    Each new centre is the best of ``2 + ln k`` candidates drawn with probability proportional to
    the squared distance to the nearest centre so far. Random numbers come from ``generator`` (a
    CPU generator), so the draws are the same whichever device ``x`` is on.

    Args:
        x: ``(n, d)`` float32 vectors, ``n >= k``.
        k: Number of centres.
        generator: Seeded CPU ``torch.Generator``.

    Returns:
        ``(k, d)`` float32 centres, rows of ``x``.
    """
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    closest = _sq_dist(x, x_sq, x[first : first + 1])[:, 0]
    for _ in range(1, k):
        cumulative = torch.cumsum(closest.double(), 0)
        draws = torch.rand(n_trials, generator=generator, dtype=torch.float64).to(x.device)
        ids = torch.searchsorted(cumulative, draws * cumulative[-1]).clamp_(max=n - 1)
        candidate = torch.minimum(closest[:, None], _sq_dist(x, x_sq, x[ids]))
        best = int(torch.argmin(candidate.double().sum(0)))
        closest = candidate[:, best].contiguous()
        centres.append(x[ids[best]])
    return torch.stack(centres)


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def lloyd(
    chunks: ChunkPass,
    centroids: torch.Tensor,
    *,
    max_iter: int,
    tol_abs: float,
    n_expected: int | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Lloyd iterations, one pass over ``chunks()`` each.

    Stops when the summed squared centroid shift is at most ``tol_abs`` (sklearn's rule, with
    ``tol_abs = tol * mean feature variance``) or after ``max_iter`` passes. A cluster left empty
    takes the farthest vector of the pass from its centre (sklearn's relocation), so ``k``
    clusters survive.

    Returns:
        (centroids, inertia of the last assignment pass, passes run).
    """
    inertia = math.nan
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        sums, counts, inertia, n, far = _assign_pass(chunks(), centroids)
        if n_expected is not None and n != n_expected:
            raise KMeansError(
                f"the data source gave {n} vectors on pass {n_iter + 1} but {n_expected} on pass 1; "
                "a callable source must give the same vectors on every call"
            )
        new = (sums / counts.clamp_min(1)[:, None].double()).to(centroids.dtype)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        for slot, row in zip(empty, far, strict=False):
            new[slot] = row
        shift = float(((new - centroids).double() ** 2).sum())
        centroids = new
        if shift <= tol_abs:
            break
    return centroids, inertia, n_iter


#: Bytes of one CPU sub-block of a chunk: small enough to stay in cache between the distance product
#: and the per-cluster sums that read it again (measured on a 2-core EPYC, 1 MiB L2 per core).
_CPU_BLOCK_BYTES = 2 << 20


def _block_rows(device: torch.device, d: int) -> int:
    """Rows per sub-block: cache-sized on the CPU; the whole chunk on CUDA (big kernels are faster)."""
    if device.type != "cpu":
        return 1 << 62
    return max(128, _CPU_BLOCK_BYTES // (4 * max(d, 1)))


def _assign_pass(
    chunks: Iterator[torch.Tensor], centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float, int, torch.Tensor]:
    """One assignment pass: per-cluster float64 sums and counts, inertia, vectors seen, far rows.

    Each chunk is walked in sub-blocks (:func:`_block_rows`) so that a block is still in cache
    when the sums read it again. Sums: on the CPU ``index_add_`` into a float32 ``(k, d)`` scratch
    (deterministic there: rows are added in index order), then added to float64 totals; on CUDA a
    one-hot matrix product, because CUDA's ``index_add_`` adds with atomics in no fixed order.
    """
    k, d = centroids.shape
    device = centroids.device
    on_cpu = device.type == "cpu"
    c_sq = (centroids * centroids).sum(1)
    c_t = centroids.T
    sums = torch.zeros((k, d), dtype=torch.float64, device=device)
    scratch = torch.zeros((k, d), dtype=centroids.dtype, device=device)
    counts = torch.zeros(k, dtype=torch.int64, device=device)
    inertia = torch.zeros((), dtype=torch.float64, device=device)
    far_dist = torch.empty(0, device=device)
    far_rows = torch.empty((0, d), device=device)
    n = 0
    block = _block_rows(device, d)
    for x in chunks:
        m = x.shape[0]
        dist = torch.empty(m, dtype=x.dtype, device=device)
        xb = x[:0]
        for start in range(0, m, block):
            xb = x[start : start + block]
            # ||c||^2 - 2 x.c in one addmm; ||x||^2 is added after the argmin (it does not change it).
            partial, labels = torch.addmm(c_sq[None, :], xb, c_t, alpha=-2.0).min(1)
            # vector_norm avoids an (n, d) temporary that xb * xb would allocate.
            part = dist[start : start + block]
            torch.add(torch.linalg.vector_norm(xb, dim=1).square_(), partial, out=part)
            if on_cpu:
                scratch.zero_().index_add_(0, labels, xb)
            else:
                onehot = torch.zeros((k, xb.shape[0]), dtype=xb.dtype, device=device)
                torch.mm(onehot.scatter_(0, labels[None, :], 1.0), xb, out=scratch)
            sums += scratch
            counts += torch.bincount(labels, minlength=k)
        dist.clamp_min_(0.0)
        inertia += dist.sum(dtype=torch.float64)
        # Keep the k farthest vectors of the pass: candidates for clusters left empty.
        top = torch.topk(dist, min(k, m))
        far_dist = torch.cat([far_dist, top.values])
        far_rows = torch.cat([far_rows, x[top.indices]])
        keep = torch.topk(far_dist, min(k, far_dist.shape[0])).indices
        far_dist, far_rows = far_dist[keep], far_rows[keep]
        n += m
        del x, xb, dist, top  # drop the chunk (and views of it) before the next one is produced
    return sums, counts, float(inertia), n, far_rows


def fit_torch(
    one_pass: ChunkPass,
    *,
    reiterable: bool,
    k: int,
    seed: int,
    max_iter: int,
    tol: float,
    n_init: int,
    sample_size: int,
    device: torch.device,
    to_device: Callable[[torch.Tensor], torch.Tensor],
) -> TorchFit:
    """Fit K-means over a stream of chunks.

    Pass 1 fills a reservoir of ``sample_size`` vectors. ``n_init`` k-means++ seedings, each
    refined by Lloyd on the reservoir, compete on reservoir inertia; the winner is refined by
    Lloyd passes over the whole stream when it is re-iterable and larger than the reservoir.
    When the reservoir holds every vector, the reservoir fit is already the full fit.

    Args:
        one_pass: Gives one pass over the prepared (validated, float32, normalised if asked)
            chunks, on their source device.
        reiterable: Whether ``one_pass`` may be called again; a one-shot iterator is fitted on
            its reservoir sample alone.
        k, seed, max_iter, tol, n_init, sample_size: As in ``KMeansParams``.
        device: Where the arithmetic runs.
        to_device: Moves a prepared chunk to ``device``.
    """
    reservoir = ReservoirSampler(sample_size, seed=seed)
    for chunk in one_pass():
        reservoir.add(chunk)
        del chunk
    n_seen = reservoir.n_seen
    if n_seen < k:
        raise KMeansError(f"only {n_seen} vectors to cluster into k={k}; give at least k vectors")
    sample = torch.from_numpy(reservoir.sample).to(device)
    del reservoir
    # sklearn scales tol by the mean feature variance; the reservoir estimates it (exactly when it
    # holds every vector).
    tol_abs = tol * float(sample.double().var(0, unbiased=False).mean())
    generator = torch.Generator().manual_seed(seed)
    batch = max(1, min(sample.shape[0], 65536))

    def sample_pass() -> Iterator[torch.Tensor]:
        for start in range(0, sample.shape[0], batch):
            yield sample[start : start + batch]

    best: tuple[torch.Tensor, float, int] | None = None
    for _ in range(n_init):
        init = kmeans_plus_plus(sample, k, generator=generator)
        trial = lloyd(sample_pass, init, max_iter=max_iter, tol_abs=tol_abs)
        if best is None or trial[1] < best[1]:
            best = trial
    assert best is not None  # n_init >= 1 is checked by KMeansParams
    centroids, inertia, n_iter = best
    n_fit = sample.shape[0]
    if n_seen > sample.shape[0] and reiterable:
        del sample

        def full_pass() -> Iterator[torch.Tensor]:
            for chunk in one_pass():
                yield to_device(chunk)
                del chunk

        centroids, inertia, n_iter = lloyd(
            full_pass, centroids, max_iter=max_iter, tol_abs=tol_abs, n_expected=n_seen
        )
        n_fit = n_seen
    return TorchFit(
        centroids=centroids.float(), inertia=inertia, n_iter=n_iter, n_vectors=n_seen, n_fit_vectors=n_fit
    )


def as_numpy(centroids: torch.Tensor) -> np.ndarray:
    """Centroids as a contiguous float32 host array."""
    return np.ascontiguousarray(centroids.detach().to("cpu", torch.float32).numpy())

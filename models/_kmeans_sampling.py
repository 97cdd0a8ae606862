"""Vectors for K-means: pixel vectors under a mask, L2 normalisation, reservoir and stratified samples.

Everything here takes numpy arrays or torch tensors and never opens a store, so the same helpers
serve the per-sample (paper) mode, the cohort mode and a notebook.
"""

from __future__ import annotations

import hashlib
from typing import TypeVar

import numpy as np
import torch

from equislide.models._errors import KMeansError

__all__ = ["ReservoirSampler", "StratifiedSampler", "l2_normalise", "masked_vectors"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# Below this norm a vector counts as zero and is left at zero rather than blown up to noise.
_NORM_EPS = 1e-12


def l2_normalise(vectors: ArrayT) -> ArrayT:
    """Scale each vector (the last axis) to unit Euclidean length.

    Args:
        vectors: ``(..., d)`` numpy array or torch tensor, any float dtype (float16 included).

    Returns:
        A new float32 array or tensor of the same shape (same device for a tensor). Zero vectors
        stay zero.
    """
    if isinstance(vectors, torch.Tensor):
        # float16 feature maps are upcast: their squared norms overflow float16 above ~256.
        return torch.nn.functional.normalize(vectors.float(), dim=-1, eps=_NORM_EPS)
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, _NORM_EPS)


def masked_vectors(feature_map: ArrayT, mask: ArrayT | None = None) -> ArrayT:
    """The per-pixel feature vectors of a map, optionally only where ``mask`` is true.

    Args:
        feature_map: ``(C, h, w)`` or ``(n_tiles, C, h, w)`` feature map (numpy or torch).
        mask: Boolean ``(h, w)`` (or ``(n_tiles, h, w)``) at feature resolution, true where the
            pixel is tissue; ``None`` keeps every pixel.

    Returns:
        ``(n, C)`` vectors in row-major pixel order (tile, row, column), same type and dtype as
        ``feature_map``.

    Raises:
        KMeansError: the map is not 3-D or 4-D, or the mask's shape or dtype does not fit it.
    """
    if feature_map.ndim not in (3, 4):
        raise KMeansError(
            f"feature_map has shape {tuple(feature_map.shape)}; expected (C, h, w) or (n_tiles, C, h, w)"
        )
    spatial = tuple(feature_map.shape[:-3]) + tuple(feature_map.shape[-2:])
    channels = feature_map.shape[-3]
    if isinstance(feature_map, torch.Tensor):
        pixels = feature_map.movedim(-3, -1)
        if mask is None:
            return pixels.reshape(-1, channels)
        mask_t = torch.as_tensor(mask, device=feature_map.device)
        _check_mask(tuple(mask_t.shape), mask_t.dtype == torch.bool, spatial)
        return pixels[mask_t]
    pixels = np.moveaxis(np.asarray(feature_map), -3, -1)
    if mask is None:
        return np.ascontiguousarray(pixels.reshape(-1, channels))
    mask_np = np.asarray(mask)
    _check_mask(mask_np.shape, mask_np.dtype == np.bool_, spatial)
    return pixels[mask_np]


def _check_mask(shape: tuple[int, ...], is_bool: bool, spatial: tuple[int, ...]) -> None:
    if shape != spatial:
        raise KMeansError(
            f"mask has shape {shape} but the feature map's pixels are {spatial}; resize the mask to "
            "feature resolution first"
        )
    if not is_bool:
        raise KMeansError("mask must be boolean (true = tissue); convert it with mask > 0")


class ReservoirSampler:
    """A uniform sample of at most ``capacity`` vectors from a stream of unknown length.

    Algorithm R (Vitter 1985), vectorised per chunk: the first ``capacity`` vectors fill the
    reservoir; vector number ``i`` (0-based) after that replaces slot ``j ~ U{0..i}`` when
    ``j < capacity``. Every vector seen ends up in the sample with probability
    ``capacity / n_seen``. Memory is ``capacity x d`` float32, whatever the stream's length.

    The sample depends only on ``seed`` and the order of the vectors, not on how they were split
    into chunks (one random draw per vector past the fill, in stream order).

    Args:
        capacity: Most vectors kept.
        seed: Seed of the sampler's own ``numpy.random.Generator`` (an int or a tuple of
            non-negative ints, as ``numpy.random.SeedSequence`` takes); no global state is used.
    """

    def __init__(self, capacity: int, *, seed: int | tuple[int, ...] = 0) -> None:
        if not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise KMeansError(f"capacity={capacity!r}; it must be a positive integer")
        self.capacity = int(capacity)
        #: Vectors offered so far.
        self.n_seen = 0
        self._rng = np.random.default_rng(seed)
        self._buffer: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"ReservoirSampler(capacity={self.capacity}, n_seen={self.n_seen})"

    def add(self, chunk: np.ndarray | torch.Tensor) -> None:
        """Offer the ``(n, d)`` vectors of ``chunk`` (numpy or torch, any device) to the sample.

        Only the rows that enter the reservoir are copied (and, for a GPU tensor, moved to the
        host); the chunk itself is not kept.
        """
        if chunk.ndim != 2:
            raise KMeansError(f"a chunk must be (n, d) vectors; got shape {tuple(chunk.shape)}")
        n, d = chunk.shape
        if self._buffer is None:
            self._buffer = np.empty((self.capacity, d), dtype=np.float32)
        elif d != self._buffer.shape[1]:
            raise KMeansError(f"chunk has {d} features but earlier chunks had {self._buffer.shape[1]}")
        start = self.n_seen
        fill = max(0, min(self.capacity - start, n))
        if fill:
            self._buffer[start : start + fill] = _rows(chunk, np.arange(fill))
        if n > fill:
            positions = np.arange(start + fill, start + n, dtype=np.int64)
            slots = self._rng.integers(0, positions + 1)
            taken = np.flatnonzero(slots < self.capacity)
            if taken.size:
                # Sequentially a later vector overwrites an earlier one drawn to the same slot; keep
                # only the last draw per slot (numpy leaves repeated-index assignment unspecified).
                last_first = taken[::-1]
                unique_slots, first = np.unique(slots[last_first], return_index=True)
                self._buffer[unique_slots] = _rows(chunk, fill + last_first[first])
        self.n_seen += n

    @property
    def sample(self) -> np.ndarray:
        """A float32 copy of the sample, ``(min(capacity, n_seen), d)``; ``(0, 0)`` before any add."""
        if self._buffer is None:
            return np.empty((0, 0), dtype=np.float32)
        return self._buffer[: min(self.capacity, self.n_seen)].copy()


def _rows(chunk: np.ndarray | torch.Tensor, index: np.ndarray) -> np.ndarray:
    if isinstance(chunk, torch.Tensor):
        picked = chunk[torch.as_tensor(index, device=chunk.device)]
        return picked.detach().to("cpu", torch.float32).numpy()
    return np.asarray(chunk)[index]


class StratifiedSampler:
    """An equal share of vectors from each sample: one :class:`ReservoirSampler` per sample ID.

    The cohort mode fits one K-means on this sample so a large slide cannot drown a small core.
    Each sample's reservoir is seeded from ``seed`` and the sample ID, so the result does not
    depend on the order in which samples (say, Dask tasks) arrive, and :attr:`sample` stacks the
    strata in sorted-ID order.

    Args:
        per_sample_capacity: Most vectors kept per sample.
        seed: Base seed.
    """

    def __init__(self, per_sample_capacity: int, *, seed: int = 0) -> None:
        if not isinstance(per_sample_capacity, (int, np.integer)) or per_sample_capacity < 1:
            raise KMeansError(f"per_sample_capacity={per_sample_capacity!r}; it must be a positive integer")
        self.per_sample_capacity = int(per_sample_capacity)
        self.seed = seed
        self._strata: dict[str, ReservoirSampler] = {}

    def __repr__(self) -> str:
        return (
            f"StratifiedSampler(per_sample_capacity={self.per_sample_capacity}, samples={len(self._strata)})"
        )

    def add(self, sample_id: str, chunk: np.ndarray | torch.Tensor) -> None:
        """Offer ``(n, d)`` vectors of sample ``sample_id``; a sample may arrive in many chunks."""
        sampler = self._strata.get(sample_id)
        if sampler is None:
            digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
            stratum_seed = (int(self.seed), int.from_bytes(digest[:8], "little"))
            sampler = self._strata[sample_id] = ReservoirSampler(self.per_sample_capacity, seed=stratum_seed)
        sampler.add(chunk)

    @property
    def sample_ids(self) -> tuple[str, ...]:
        """The sample IDs seen, sorted."""
        return tuple(sorted(self._strata))

    def n_seen(self, sample_id: str) -> int:
        """Vectors offered for ``sample_id`` (0 if none)."""
        sampler = self._strata.get(sample_id)
        return 0 if sampler is None else sampler.n_seen

    @property
    def sample(self) -> np.ndarray:
        """All strata's samples stacked in sorted sample-ID order, float32 ``(m, d)``."""
        parts = [self._strata[s].sample for s in self.sample_ids]
        if not parts:
            return np.empty((0, 0), dtype=np.float32)
        return np.concatenate(parts)

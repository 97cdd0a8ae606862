"""Make e2cnn 0.2.3 (the last release, 2021) run on numpy 2.

e2cnn predates numpy 2 and is no longer maintained, so it cannot be fixed upstream. The uses that
numpy 2 removed, found by scanning every ``np.`` access and array method in e2cnn's source:

* ``ndarray.tostring()`` (removed in numpy 2.3) in the ``__hash__`` of four kernel-basis classes in
  ``e2cnn.kernels.irreps_basis``. Any ``FlipRot2dOnR2`` (D_N) or O(2) ``R2Conv`` hashes its basis to
  look it up in a cache, so D4 convolutions cannot be built at all.
* ``np.array(x, copy=False)`` in ``psi``, ``chi`` and ``psichi`` of ``e2cnn.kernels.utils``. numpy 2
  turned ``copy=False`` from "copy only if needed" into "never copy, else raise", and these are
  called with plain Python numbers, which always need a copy.
* ``np.float`` (removed in numpy 1.24) in ``O2.induced_representation`` in
  ``e2cnn.group.groups.o2group``.

Everything is patched on e2cnn's own objects; the ``numpy`` module itself is left untouched.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

__all__ = ["ensure_e2cnn_numpy2_compat"]

_PATCHED = False

_HASHED_BASES = (
    "R2FlipsSolution",
    "R2ContinuousRotationsSolution",
    "R2FlipsDiscreteRotationsSolution",
    "R2FlipsContinuousRotationsSolution",
)


class _Numpy1Semantics(types.ModuleType):
    """numpy with the two numpy-1 behaviours e2cnn relies on, for one e2cnn module's ``np`` name.

    Rebinding the name ``np`` inside ``e2cnn.kernels.utils`` and ``o2group`` fixes every use there
    (including ones called through the re-exports in ``e2cnn.group`` and ``e2cnn.kernels``) without
    copying e2cnn's functions, and without adding aliases to the real ``numpy`` for everyone else.
    """

    float = float

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def array(obj: Any, *args: Any, copy: bool | None = True, **kwargs: Any) -> np.ndarray:
        # numpy-1 copy=False meant "avoid a copy if possible", which is numpy 2's copy=None.
        return np.array(obj, *args, copy=None if copy is False else copy, **kwargs)


def _hash_part(value: Any) -> int:
    return hash(value.tobytes()) if isinstance(value, np.ndarray) else hash(value)


def _basis_hash(self: Any) -> int:
    # Same value as e2cnn's original: tostring() returned exactly tobytes()'s bytes.
    return hash(self.in_irrep) + hash(self.out_irrep) + _hash_part(self.mu) + _hash_part(self.gamma)


def ensure_e2cnn_numpy2_compat() -> None:
    """Patch e2cnn 0.2.3 in place so that its groups and steerable bases build on numpy 2.

    Idempotent and cheap after the first call. Harmless on numpy 1 (the patched code computes the
    same values).

    Raises:
        ImportError: e2cnn is not installed.
    """
    global _PATCHED
    if _PATCHED:
        return
    import e2cnn.group.groups.o2group as o2group
    import e2cnn.kernels.irreps_basis as irreps_basis
    import e2cnn.kernels.utils as kernel_utils

    shim = _Numpy1Semantics()
    kernel_utils.np = shim  # type: ignore[attr-defined]
    o2group.np = shim  # type: ignore[attr-defined]
    for name in _HASHED_BASES:
        getattr(irreps_basis, name).__hash__ = _basis_hash
    _PATCHED = True

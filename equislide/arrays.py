"""The array-module switch: the same numerical code runs with numpy on the host and cupy on a GPU.

``xp = array_module(x)`` is cupy when ``x`` is a cupy array and numpy otherwise, so a function written
against ``xp`` keeps a GPU batch on the GPU. cupy is optional (the ``gpu`` extra) and imported only when
a cupy array is actually seen: a numpy-only caller never pays for it, and a machine without cupy never
fails. Hand-offs to and from torch go through DLPack (:func:`to_torch`, :func:`like`), which shares the
device buffer instead of copying it through the host.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["CUPY_INSTALL_HINT", "array_module", "asnumpy", "cupy_or_none", "is_cupy", "like", "to_torch"]

#: How to get cupy; named in errors that need it.
CUPY_INSTALL_HINT = "pip install 'equislide[gpu]' (cupy-cuda12x)"


def is_cupy(x: Any) -> bool:
    """``x`` is a cupy array (decided from its type, without importing cupy)."""
    return type(x).__module__.split(".", 1)[0] == "cupy"


def cupy_or_none() -> ModuleType | None:
    """The cupy module, or None when it is not installed or finds no usable GPU."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # cupy without a driver raises its own CUDARuntimeError; all mean "no GPU here"
        return None
    return cupy


def array_module(*arrays: Any) -> ModuleType:
    """cupy when any of ``arrays`` is a cupy array, else numpy (torch tensors and lists count as host)."""
    if any(is_cupy(a) for a in arrays):
        import cupy

        return cupy
    return np


def asnumpy(x: Any) -> np.ndarray:
    """``x`` on the host as numpy (a copy from the device for cupy; torch tensors via ``.cpu()``)."""
    if is_cupy(x):
        return x.get()
    if type(x).__module__.split(".", 1)[0] == "torch":
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_torch(x: Any):
    """``x`` as a torch tensor on the device it lives on: cupy through DLPack (shared device memory, no
    host round trip), numpy without a copy where it can (``torch.as_tensor``), tensors unchanged."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if is_cupy(x):
        return torch.from_dlpack(x)
    return torch.as_tensor(np.asarray(x))


def like(t: Any, reference: Any) -> Any:
    """A torch result ``t`` in the kind of array ``reference`` was: cupy (DLPack, same device memory),
    numpy (host copy) or the tensor itself."""
    import torch

    if isinstance(reference, torch.Tensor):
        return t
    if is_cupy(reference):
        import cupy

        return cupy.from_dlpack(t)
    return t.detach().cpu().numpy()

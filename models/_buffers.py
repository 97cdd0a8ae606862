"""Output buffers of the SRE-Conv inference path, pooled across layers and calls.

Each layer's output is a fresh allocation of up to hundreds of MB (64 channels x 512 px x batch),
which glibc maps fresh from the kernel (everything over its mmap threshold, at most 32 MiB), so its
first write pays a page fault and the zeroing of every page; torch's CPU allocator caches nothing.
Under torch.profiler the bias copy into each fresh output strip was 11-17 % of SRENet-18 at
224-512 px; taking the outputs from this pool made the network 1.00-1.17x faster (Zen 5, fp32 and
bf16, 1 and 2 threads; README, Measured). A buffer is handed out as a view
(:meth:`torch.Tensor.detach`) and is free again once nothing but the pool holds its storage, so
features a caller keeps are never overwritten.

The pool holds at most ``EQUISLIDE_BUFFER_POOL_MB`` (default 4096; 0 switches it off) of free and
lent buffers together; beyond that outputs are plain allocations. :func:`release` frees what is not
in use; the feature stage calls it when each of its tasks ends.
"""

from __future__ import annotations

import math
import os
import threading

import torch
from torch import Tensor

_lock = threading.Lock()
_pool: dict[tuple, list[Tensor]] = {}
_held = 0  # bytes of the pooled buffers, lent or free
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _limit() -> int:
    try:
        return max(0, int(os.environ.get("EQUISLIDE_BUFFER_POOL_MB", "4096"))) << 20
    except ValueError:
        return 4096 << 20


def _free(buf: Tensor) -> bool:
    # The pool's own tensor is the storage's one user; the temporary storage object asked here
    # holds a second reference while it lives.
    return _use_count(buf.untyped_storage()._cdata) == 2  # type: ignore[misc]


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A channels_last tensor of ``shape``, from the pool where it can be (CPU, pool on)."""
    limit = _limit()
    if device.type != "cpu" or limit == 0 or _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    global _held
    # Tensors made under inference_mode cannot be written outside it: each mode has its own buffers.
    key = (tuple(shape), dtype, device, torch.is_inference_mode_enabled())
    size = math.prod(shape) * dtype.itemsize
    with _lock:
        for buf in _pool.get(key, ()):
            if _free(buf):
                return buf.detach()
        if _held + size > limit:
            _drop_free()
        buf = torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
        if _held + size > limit:
            return buf  # still beyond the limit: a plain allocation
        _pool.setdefault(key, []).append(buf)
        _held += size
        return buf.detach()


def _drop_free() -> None:
    global _held
    for key in list(_pool):
        kept = []
        for buf in _pool[key]:
            if _free(buf):
                _held -= buf.numel() * buf.element_size()
            else:
                kept.append(buf)
        if kept:
            _pool[key] = kept
        else:
            del _pool[key]


def release() -> None:
    """Free the pooled buffers no caller holds."""
    with _lock:
        _drop_free()


def held_bytes() -> int:
    """Bytes the pool holds, lent or free."""
    return _held

"""The SRE-Conv strip path's mixing GEMM through oneDNN's matmul, where that beats ``torch.mm``.

In float32, ``torch.mm`` and ``torch.addmm`` on CPU call MKL's sgemm, and on AMD CPUs MKL runs its
AVX2 code even where the core has AVX-512: 76-117 GFLOP/s on one Zen 5 core for the SRENet-18
mixing shapes, against 155-245 for oneDNN (``torch.ops.mkldnn._linear_pointwise``, the op
Inductor's CPU fusions call), which picks its AVX-512 kernels on any vendor (bench/sre_conv.py,
"oneDNN mix x torch.mm"; README, Measured). bf16 ``mm`` already goes to oneDNN, so only float32
is routed here. GEMMs under a million multiply-adds stay on ``torch.mm``: oneDNN's per-call cost
made those slower. On Intel CPUs, whose MKL sgemm has AVX-512 code, the two were not timed against
each other; oneDNN is used there too (outputs tested equal to ``torch.mm``'s).

``EQUISLIDE_ONEDNN_MIX=0`` switches this off; so does ``torch.backends.mkldnn.enabled = False``.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_MIN_MACS = 1 << 20
_DTYPES = (torch.float32,)


@lru_cache(maxsize=1)
def _op():
    if os.environ.get("EQUISLIDE_ONEDNN_MIX", "1").lower() in ("0", "off", "false", "no"):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_broken: list[str] = []  # set once a call failed: every later GEMM takes torch.mm


def usable(sums: Tensor, weight: Tensor) -> bool:
    """Whether ``sums @ weight`` (``(P, K) @ (K, N)``) goes to oneDNN."""
    return (
        sums.device.type == "cpu"
        and sums.dtype in _DTYPES
        and weight.dtype == sums.dtype
        and sums.shape[0] * sums.shape[1] * weight.shape[1] >= _MIN_MACS
        and torch.backends.mkldnn.enabled
        and not _broken
        and _op() is not None
    )


def mix(
    sums: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, relu: bool
) -> Tensor | None:
    """``relu(sums @ weight + bias + residual)`` (residual and ReLU optional) as a new tensor, or
    None where oneDNN refused the call (logged once; the caller then takes ``torch.mm``)."""
    op = _op()
    wt = weight.t()  # oneDNN takes (N, K); the transposed view ran as fast as a contiguous copy
    try:
        if residual is None:
            return op(sums, wt, bias, "relu" if relu else "none", [None] if relu else [], "")
        out = op.binary(sums, residual, wt, bias, "add")  # no ReLU after a binary post-op here
    except RuntimeError as err:
        _broken.append(str(err))
        log.warning("oneDNN matmul unavailable for the SRE-Conv mixing (%s); using torch.mm", str(err)[:200])
        return None
    return out.clamp_min_(0) if relu else out

"""Running a backbone at the device's pace: batch size from free device memory, ``torch.compile`` with
an eager fallback, channels_last on CUDA.

:func:`choose_batch_tiles` keeps the configured batch on the CPU (memory there is the process budget's
business) and on CUDA sizes the batch from ``torch.cuda.mem_get_info`` and a per-tile estimate
(:func:`activation_bytes_per_tile`: the largest input + output of any layer, measured once on a small
probe and scaled to the tile side, times an overhead for what the layers hold inside).
:func:`accelerate` wraps a backbone so that ``features(x, layer)`` runs compiled when
``EQUISLIDE_COMPILE=1`` (falling back to eager, with one warning, when compilation fails) and in
channels_last memory format on CUDA. Neither changes what is computed: the wrapper's features equal the
eager network's to float rounding.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "COMPILE_ENV",
    "AcceleratedBackbone",
    "accelerate",
    "activation_bytes_per_tile",
    "batch_for_memory",
    "choose_batch_tiles",
    "compile_enabled",
]

#: Environment variable turning ``torch.compile`` of the backbone's features on (``1``); off by default.
COMPILE_ENV = "EQUISLIDE_COMPILE"
#: Share of the free device memory a batch may plan to use (the rest: allocator fragmentation, cuDNN
#: workspaces, other processes on the GPU).
SAFETY = 0.6
#: Bytes a layer holds inside per byte of its largest input + output (SRE-Conv's ring sums, BatchNorm and
#: ReLU temporaries, the residual branch), by default.
OVERHEAD = 3.0
#: Largest batch ever chosen from memory (beyond it a GPU is saturated and a batch only costs latency).
MAX_BATCH = 256


def compile_enabled() -> bool:
    """``EQUISLIDE_COMPILE`` is ``1``, ``true``, ``yes`` or ``on``."""
    return os.environ.get(COMPILE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def batch_for_memory(
    free_bytes: int,
    per_tile_bytes: int,
    *,
    safety: float = SAFETY,
    overhead: float = OVERHEAD,
    minimum: int = 1,
    maximum: int = MAX_BATCH,
) -> int:
    """Tiles per forward pass that fit ``safety * free_bytes`` at ``overhead * per_tile_bytes`` each.

    Args:
        free_bytes: Free device memory (``torch.cuda.mem_get_info()[0]``).
        per_tile_bytes: One tile's largest layer input + output (:func:`activation_bytes_per_tile`).
        safety: Share of the free memory planned for (0 < safety <= 1).
        overhead: Multiplier for what a layer holds beyond its input and output (>= 1).
        minimum: Never fewer (a batch of one must run even if the estimate says it does not fit: the
            estimate is conservative, and an out-of-memory error then names the real problem).
        maximum: Never more.

    Raises:
        ValueError: A non-positive size, safety outside (0, 1], overhead < 1 or minimum > maximum.
    """
    if per_tile_bytes <= 0 or free_bytes < 0:
        raise ValueError(f"per_tile_bytes={per_tile_bytes} must be > 0 and free_bytes={free_bytes} >= 0")
    if not 0 < safety <= 1 or overhead < 1:
        raise ValueError(f"safety={safety} must be in (0, 1] and overhead={overhead} >= 1")
    if not 1 <= minimum <= maximum:
        raise ValueError(f"need 1 <= minimum={minimum} <= maximum={maximum}")
    fits = math.floor(free_bytes * safety / (per_tile_bytes * overhead))
    return int(min(maximum, max(minimum, fits)))


def activation_bytes_per_tile(
    backbone: nn.Module, *, side: int, layer: int, dtype_bytes: int = 4, probe_side: int | None = None
) -> int:
    """One tile's largest (input + output) of any leaf layer of ``backbone.features(x, layer)``, in bytes,
    at ``side`` px.

    Measured with forward hooks on one ``probe_side`` px tile (default: the layer's stride x 8, at least
    32 px) where the network is, then scaled by ``(side / probe_side) ** 2``: a convolutional network's
    activations grow with the tile's area.
    """
    from equislide.models.extract import feature_stride

    stride = feature_stride(backbone, layer)
    probe = int(probe_side or max(32, 8 * stride))
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    peak = 0

    def numel(v: Any) -> int:
        if isinstance(v, Tensor):
            return v.numel()
        if isinstance(v, (tuple, list)):
            return sum(numel(e) for e in v)
        return 0

    def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal peak
        peak = max(peak, numel(inputs) + numel(output))

    leaves = [m for m in backbone.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            backbone.features(torch.zeros(1, 3, probe, probe, device=device), layer)  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    return int(math.ceil(peak * dtype_bytes * (side / probe) ** 2))


def choose_batch_tiles(
    backbone: nn.Module,
    device: str | torch.device,
    *,
    side: int,
    layer: int,
    default: int,
    maximum: int = MAX_BATCH,
) -> int:
    """Tiles per forward pass: ``default`` on the CPU; on CUDA as many as the free memory holds
    (:func:`batch_for_memory` of :func:`activation_bytes_per_tile`), at most ``maximum``."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return int(default)
    free, _total = torch.cuda.mem_get_info(dev)
    per_tile = activation_bytes_per_tile(backbone, side=side, layer=layer)
    return batch_for_memory(int(free), per_tile, maximum=max(1, int(maximum)))


class AcceleratedBackbone(nn.Module):
    """``backbone`` whose ``features(x, layer)`` runs compiled and/or in channels_last format.

    Everything else (``feature_strides``, ``feature_channels``, ``config``, parameters) is the wrapped
    network's. A compilation failure (no C++ compiler, an unsupported operation, any exception of the
    compiled call) switches this wrapper to eager for good, with one :class:`RuntimeWarning`, and the
    batch is computed eagerly.

    Args:
        backbone: A network with ``features(x, layer)``.
        compile: Compile ``backbone.features`` with ``torch.compile`` (``dynamic=False``: tile batches
            keep one shape, and the last, smaller batch of a shard compiles once more).
        channels_last: Run in ``torch.channels_last`` (the model's weights and each input).
        backend: ``torch.compile``'s backend (``"inductor"``: generated C++ / Triton kernels).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        compile: bool = False,
        channels_last: bool = False,
        backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.inner = backbone
        self.channels_last = bool(channels_last)
        self.compile_failed: str | None = None
        self._compiled: Any = None
        if self.channels_last:
            backbone.to(memory_format=torch.channels_last)
        if compile:
            try:
                self._compiled = torch.compile(backbone.features, dynamic=False, backend=backend)
            except Exception as err:  # torch.compile itself refusing (an unsupported platform)
                self._fall_back(err)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    @property
    def compiled(self) -> bool:
        """``features`` runs the compiled function (until a failure falls back to eager)."""
        return self._compiled is not None

    def _fall_back(self, err: BaseException) -> None:
        self._compiled = None
        self.compile_failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(
            f"torch.compile of {type(self.inner).__name__}.features failed ({self.compile_failed}); "
            f"running eager (unset {COMPILE_ENV} to skip compiling)",
            RuntimeWarning,
            stacklevel=3,
        )

    def features(self, x: Tensor, layer: int) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._compiled is not None:
            try:
                return self._compiled(x, layer)
            except Exception as err:  # a compiler error surfaces at the first call; eager is always right
                self._fall_back(err)
        return self.inner.features(x, layer)  # type: ignore[operator]


_WRAPPED_ATTR = "_equislide_accelerated"


def accelerate(
    backbone: nn.Module,
    device: str | torch.device,
    *,
    compile: bool | None = None,
    channels_last: bool | None = None,
) -> nn.Module:
    """``backbone`` ready for ``device``: :class:`AcceleratedBackbone` when compiling (default: as
    :func:`compile_enabled` says) or channels_last (default: on CUDA) is asked for, else itself.

    The wrapper is made once per network and options (a compiled function is reused by every later
    call of the process, so the compilation is paid once per worker).
    """
    dev = torch.device(device)
    do_compile = compile_enabled() if compile is None else bool(compile)
    do_cl = (dev.type == "cuda") if channels_last is None else bool(channels_last)
    if not (do_compile or do_cl):
        return backbone
    per_model = backbone.__dict__.get(_WRAPPED_ATTR)
    if per_model is None:
        # A plain attribute, not a submodule (object.__setattr__ skips nn.Module's registration): the
        # wrappers live and die with the network, and its state_dict stays as it was.
        per_model = {}
        object.__setattr__(backbone, _WRAPPED_ATTR, per_model)
    key = (do_compile, do_cl)
    if key not in per_model:
        per_model[key] = AcceleratedBackbone(backbone, compile=do_compile, channels_last=do_cl)
    return per_model[key]

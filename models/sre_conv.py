"""SRE-Conv: symmetric rotation-equivariant convolution.

Du, Zhang, Zeevi, Dvornek, Onofrey, "SRE-Conv: Symmetric Rotation Equivariant Convolution for
Biomedical Image Classification", ISBI 2025, arXiv:2501.09753 (reference code: XYPB/SRE-Conv).

A k x k kernel holds one learnable weight per concentric ring, so it is a radial function on the
pixel grid. Two algebraically identical ways to apply it are implemented:

* ``impl="dense"`` expands the ring weights to the k x k kernel and calls ``conv2d`` (the
  reference formulation): ``C_out * C_in * k^2`` multiply-adds per output pixel.
* ``impl="ring"`` first sums the input over each ring with fixed depthwise filters (each cropped to
  the ring's own support), then mixes channels and rings with 1 x 1 convolutions:
  ``C_in * sum_r |support_r| + C_out * C_in * R`` multiply-adds, about ``R / k^2`` of the dense cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equislide.models import _buffers, _mix_gemm, _ring_kernel
from equislide.models._errors import ModelConfigError

__all__ = ["SREConv2d", "ring_basis", "ring_index", "num_rings", "Rings", "Impl"]

Rings = Literal["hard", "soft"]
Impl = Literal["auto", "dense", "ring"]


def num_rings(kernel_size: int) -> int:
    """Number of rings (learnable weights per channel pair) of an odd ``kernel_size``."""
    return kernel_size // 2 + 1


def _radius_grid(kernel_size: int) -> np.ndarray:
    m = kernel_size // 2
    yy, xx = np.mgrid[-m : m + 1, -m : m + 1]
    return np.hypot(yy, xx)


def ring_index(kernel_size: int) -> np.ndarray:
    """Hard ring of every kernel pixel, ``-1`` for pixels outside the largest ring.

    The reference binning: the Euclidean distance of each pixel from the centre is put into
    ``k // 2 + 1`` equal-width bins spanning ``[0, k // 2 + 0.5]``; farther pixels (the corners) get
    no weight. For k = 9 the rings hold 1, 8, 12, 16 and 32 pixels, for k = 5 they hold 1, 8 and 12.

    Returns:
        An int array of shape ``(k, k)`` indexed ``[row, col]``.
    """
    _check_kernel_size(kernel_size)
    m = kernel_size // 2
    d = _radius_grid(kernel_size)
    edges = np.linspace(0.0, m + 0.5, m + 2)
    idx = np.digitize(d, edges[1:-1], right=False)
    idx[d > m + 0.5] = -1
    return idx.astype(np.int64)


@lru_cache(maxsize=64)
def _ring_basis_cached(kernel_size: int, rings: str) -> np.ndarray:
    m = kernel_size // 2
    n = m + 1
    if rings == "hard":
        idx = ring_index(kernel_size)
        basis = np.stack([(idx == r) for r in range(n)]).astype(np.float64)
    elif rings == "soft":
        # Ring r sits at radius r; a pixel at distance d gets the linear interpolation of the two
        # rings around it. A virtual zero ring at radius m + 1 tapers the outermost ring to nothing,
        # so the support stays a disc instead of being cut square by the kernel's edge.
        d = _radius_grid(kernel_size)
        basis = np.stack([np.clip(1.0 - np.abs(d - r), 0.0, None) for r in range(n)])
    else:
        raise ModelConfigError(f"rings={rings!r} is not one of 'hard', 'soft'")
    basis.setflags(write=False)
    return basis


def ring_basis(kernel_size: int, rings: Rings = "hard") -> np.ndarray:
    """Fixed basis that turns ring weights into a kernel: ``kernel = weight @ basis``.

    Returns:
        A read-only float64 array of shape ``(R, k, k)``, ``R = k // 2 + 1``. Hard rings are 0/1
        indicators (see :func:`ring_index`); soft rings are linear interpolation weights.
    """
    _check_kernel_size(kernel_size)
    return _ring_basis_cached(kernel_size, rings)


def _check_kernel_size(kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ModelConfigError(
            f"kernel_size={kernel_size!r}: SRE-Conv kernels need an odd positive size (1, 3, 5, 7, 9, ...)"
        )


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``x`` to, where it is on for ``x``'s device; None where it is off or
    leaves ``x`` alone (float64, integers)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.dtype.is_floating_point and x.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` computes in: autocast's, or ``x``'s own."""
    return autocast_dtype(x) or x.dtype


def _input_rows(x: Tensor, a: int, b: int) -> Tensor:
    """Rows ``[a, b)`` of ``x`` (N, C, H, W), zero rows standing in for those outside ``[0, H)``."""
    h = x.shape[-2]
    xs = x[:, :, max(a, 0) : min(b, h)]
    if a < 0 or b > h:
        xs = F.pad(xs, (0, 0, max(0, -a), max(0, b - h)))
    return xs


def _support_halfwidth(plane: np.ndarray) -> int:
    m = plane.shape[0] // 2
    rows, cols = np.nonzero(plane)
    return int(max(np.abs(rows - m).max(), np.abs(cols - m).max()))


# Per-layer choice of "auto", from bench/sre_conv.py on this project's 2-core AVX-512 CPU (torch
# 2.13): at inference the ring path is 4.6-7.5x faster than dense for every SRENet-18 layer with 64
# or more input channels, and since its rings are mixed in one GEMM (narrow layers) also for the
# 3-channel stem (1 thread, CPU time, medians of 5: 6.2 vs 8.6 ms at 224 px, 56 vs 99 ms at 512 px).
# With autograd dense wins for the stem (fwd+bwd 223 vs 255 ms at 512 px), so narrow layers use
# ring only where the inference strip path runs. Under bf16 autocast too, although oneDNN's dense
# stem on AMX tiles is faster (4.2 against 11.3 ms, 1 thread, 256 px): the ring path's features are
# bit-identical under rot90 (a ring's bf16 taps summed in float32 come out the same in any order,
# and every pixel is mixed alike), the dense kernel's differ by up to 1e-2 relative (it sums the
# rotated taps in another order), and exact 90-degree equivariance is what SRENet is for.
_AUTO_MIN_RING_CHANNELS = 16

# Inference path: rows per strip hold about this many bytes of float32 ring sums (all rings);
# 2-16 MiB measured within noise of each other for the SRENet-18 layers, 1 MiB and less lost up
# to 1.6x at 64 channels x 512 px (the halo rows each ring re-reads grow as strips shrink).
_STRIP_BYTES = 8 << 20
# Layers with at most this many input channels mix all rings in one GEMM (see _forward_ring).
_FUSED_MAX_CHANNELS = 32
# ... and with at most this many take all their ring sums in one grouped convolution over the full
# kernel, written straight into the GEMM's input (see _forward_strips): for the RGB stem 1.6-1.8x
# faster than per-ring sums copied side by side, from 16 channels 0.34-0.55x (full k x k planes
# cost more than the copies save).
_GROUPED_MAX_CHANNELS = 4


class SREConv2d(nn.Module):
    r"""2-D convolution with a radially symmetric kernel: one weight per concentric ring.

    For every element :math:`g` of the dihedral group :math:`D_4` (rotations by multiples of 90
    degrees and reflections) acting on the pixel grid,

    .. math::

        \mathrm{SREConv}(g \cdot x) = g \cdot \mathrm{SREConv}(x)

    holds exactly (to float rounding) whenever padding and stride respect the grid: ``stride = 1``
    with the default ``padding = dilation * (k // 2)``, or inputs whose sides are multiples of the
    stride. Stacked with pointwise layers, BatchNorm and 2 x 2 average pooling it gives a network
    equivariant to :math:`D_4` (see :func:`equislide.models.srenet18`).

    .. warning::

        Rings are drawn on a discrete grid, so equivariance to rotations by angles other than
        multiples of 90 degrees is only approximate (interpolation of the input and the pixelated
        rings both contribute). ``rings="soft"`` interpolates each pixel between the two nearest ring
        radii, which smooths the radial profile and lowers the error at 30 and 45 degrees.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd kernel side k; the layer has ``k // 2 + 1`` rings.
        stride: Convolution stride.
        padding: Zero padding on each side; default ``dilation * (k // 2)`` ("same" at stride 1).
        dilation: Kernel dilation.
        groups: Channel groups, as in :class:`torch.nn.Conv2d`.
        bias: Add a learnable bias per output channel.
        rings: ``"hard"`` (the reference binning, see :func:`ring_index`) or ``"soft"``.
        impl: ``"dense"``, ``"ring"`` or ``"auto"`` (the faster one for this layer's shape, as
            measured in ``bench/sre_conv.py``). Both give the same output and gradients.

    Shape:
        ``(N, C_in, H, W) -> (N, C_out, H_out, W_out)`` as for :class:`torch.nn.Conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        rings: Rings = "hard",
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        _check_kernel_size(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ModelConfigError(
                f"in_channels={in_channels} and out_channels={out_channels} must both be divisible by "
                f"groups={groups}"
            )
        if impl not in ("auto", "dense", "ring"):
            raise ModelConfigError(f"impl={impl!r} is not one of 'auto', 'dense', 'ring'")
        for name, value in (("stride", stride), ("dilation", dilation)):
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"{name}={value!r} must be a positive int")
        if padding is None:
            padding = dilation * (kernel_size // 2)
        if not isinstance(padding, int) or padding < 0:
            raise ModelConfigError(f"padding={padding!r} must be a non-negative int or None")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.rings = rings
        self.impl = impl
        basis = torch.from_numpy(np.array(ring_basis(kernel_size, rings), dtype=np.float32))
        self.num_rings = basis.shape[0]
        # Derived from the config, so kept out of state_dict: checkpoints hold only ring weights.
        self.register_buffer("basis", basis, persistent=False)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, self.num_rings))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._dense_cache: tuple[tuple, Tensor] | None = None
        self._dw_cache: dict[tuple, Tensor] = {}
        self._mix_cache: tuple[tuple, Tensor] | None = None
        self._fold_cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None
        self._ring_plan = self._plan_ring_sums(basis)
        self._grouped_sums = groups == 1 and in_channels <= _GROUPED_MAX_CHANNELS
        self._max_ring_taps = max(int(torch.count_nonzero(plane)) for plane, _, _ in self._ring_plan)
        # The C ring-sum kernel (models/ring_sums.c) where it is built; tests switch it off to
        # reach the torch paths.
        self._use_kernel = not self._grouped_sums
        self._kernel_taps: tuple[Tensor, ...] | None = None
        # float32 mixing GEMMs through oneDNN (models/_mix_gemm.py); the bench switches it off
        # for its torch.mm baseline.
        self._use_onednn = True
        self.reset_parameters()

    def _plan_ring_sums(self, basis: Tensor) -> list[tuple[Tensor, int, bool]]:
        # Each ring filter is cropped to its own support (ring r of a hard kernel spans only
        # (2r+1)^2 pixels) and reads the padded input from an offset, so the result is unchanged.
        plan = []
        m = self.kernel_size // 2
        for r in range(self.num_rings):
            h = _support_halfwidth(basis[r].numpy())
            plane = basis[r, m - h : m + h + 1, m - h : m + h + 1].clone()
            identity = h == 0 and float(plane) == 1.0  # the hard centre ring: no sum to take
            plan.append((plane, (m - h) * self.dilation, identity))
        return plan

    def on_exact_sum_grid(self, x: Tensor) -> Tensor:
        """``x`` rounded, image by image, to the power-of-two grid on which float32 sums its rings exactly.

        With hard rings (0/1 taps) every partial sum of a ring is a multiple of the grid's step
        smaller than 2^23 steps, so it is exact in any order: the ring sums, and the float32 ring
        path above them, give the same bits for an image and its rotations. Each value moves by
        at most ``taps * 2^-23`` of the image's largest (1.9e-6 for the 16 taps of a 7 x 7
        kernel's outer ring). Soft rings (fractional taps) get ``x`` back. Under autograd the
        gradient passes straight through (rounding's own is zero), and the forward value may be
        an ulp off the grid.
        """
        if self.rings != "hard":
            return x
        bound = x.detach().abs().amax(dim=tuple(range(1, x.dim())), keepdim=True) * self._max_ring_taps
        exponent = torch.frexp(torch.nan_to_num(bound, nan=0.0, posinf=0.0)).exponent  # bound < 2^e
        step = torch.ldexp(torch.ones_like(bound), exponent - 23)
        snapped = torch.round(x.detach() / step) * step
        if x.requires_grad and torch.is_grad_enabled():
            return x + (snapped - x.detach())
        return snapped

    def reset_parameters(self) -> None:
        """He (Kaiming) normal initialisation over the effective fan-in of the expanded kernel.

        The fan-in counts every kernel pixel a ring weight reaches (``sum(basis ** 2)``), not just
        the number of rings, so activations keep unit scale through depth instead of growing by the
        kernel's DC gain at every layer (which overflows float16 feature stores).
        """
        fan_in = (self.in_channels // self.groups) * float(self.basis.pow(2).sum())
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
            if self.bias is not None:
                self.bias.zero_()
        self._dense_cache = None

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rings={self.rings!r}({self.num_rings}), impl={self.impl!r}"
        )
        if self.stride != 1:
            s += f", stride={self.stride}"
        if self.padding != self.dilation * (self.kernel_size // 2):
            s += f", padding={self.padding}"
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s

    @property
    def resolved_impl(self) -> Literal["dense", "ring"]:
        """The implementation ``forward`` uses for this layer (for ``auto``, in the current grad mode)."""
        if self.impl != "auto":
            return self.impl
        if self.in_channels // self.groups >= _AUTO_MIN_RING_CHANNELS:
            return "ring"
        return "ring" if self._strip_path() else "dense"

    def dense_kernel(self) -> Tensor:
        """The expanded ``(C_out, C_in / groups, k, k)`` kernel.

        In eval mode without autograd it is cached and rebuilt only when the weights change.
        """
        cacheable = not self.training and not (torch.is_grad_enabled() and self.weight.requires_grad)
        if cacheable:
            key = (self.weight._version, self.weight.data_ptr(), self.weight.device, self.weight.dtype)
            if self._dense_cache is not None and self._dense_cache[0] == key:
                return self._dense_cache[1]
        # Built outside autocast, so the cached kernel keeps the weights' dtype whatever the caller's
        # autocast state; conv2d casts it where autocast is on.
        with torch.autocast(self.weight.device.type, enabled=False):
            kernel = torch.einsum("oir,rkl->oikl", self.weight, self.basis.to(self.weight.dtype))
        if cacheable:
            kernel = kernel.detach()
            self._dense_cache = (key, kernel)
        return kernel

    def train(self, mode: bool = True) -> SREConv2d:
        self._dense_cache = None
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        if self.resolved_impl == "dense":
            return self._forward_dense(x)
        return self._forward_ring(x)

    def _forward_dense(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.dense_kernel(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def _forward_ring(self, x: Tensor) -> Tensor:
        # channels_last lets the depthwise ring sums and the 1 x 1 mixing run as vectorised NHWC
        # kernels (about 2x over NCHW); a no-op when the network already runs NHWC.
        x = x.contiguous(memory_format=torch.channels_last)
        h_out, w_out = self._out_size(x)
        p = self.padding
        if not self._strip_path():
            xp = F.pad(x, (p, p, p, p)) if p else x
            out = self._ring_rows(xp, 0, h_out, w_out)
            if self.bias is not None:
                out = out + self.bias[None, :, None, None].to(out.dtype)
            return out
        weight = self._mix_weight(_compute_dtype(x))
        bias = None if self.bias is None else self.bias.detach().to(weight.dtype)
        return self._forward_strips(x, weight, bias, h_out, w_out)

    def _strip_path(self) -> bool:
        """Whether inference runs the row-strip path (no autograd, no groups, padding covering
        the widest ring's offset)."""
        return not torch.is_grad_enabled() and self.groups == 1 and self.padding >= self._ring_plan[0][1]

    def forward_bn(
        self,
        x: Tensor,
        bn: nn.BatchNorm2d,
        *,
        residual: Tensor | None = None,
        relu: bool = False,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``relu(bn(self(x)) + residual)``, the residual and the ReLU optional, returned in
        ``out_dtype`` (default: the dtype it computes in).

        Where the inference strip path runs and ``bn`` uses its running statistics, the BatchNorm
        is folded into the mixing GEMM (its scale into the weight's columns, its shift into the
        GEMM's bias) and the residual, the ReLU and the cast to ``out_dtype`` are applied to each
        output strip while it is in cache: three passes over the whole feature map saved per
        layer. Anywhere else (training, autograd, hooks on either module, the dense path) it calls
        the modules one by one.
        """
        if self._can_fold(bn):
            h_out, w_out = self._out_size(x)
            x = x.contiguous(memory_format=torch.channels_last)
            weight, shift = self._folded(bn, _compute_dtype(x))
            if residual is not None:
                residual = residual.to(weight.dtype).contiguous(memory_format=torch.channels_last)
            return self._forward_strips(
                x, weight, shift, h_out, w_out, residual=residual, relu=relu, out_dtype=out_dtype
            )
        out = bn(self(x))
        if residual is not None:
            out = out + residual
        out = F.relu(out, inplace=True) if relu else out
        return out if out_dtype is None else out.to(out_dtype)

    def _can_fold(self, bn: nn.BatchNorm2d) -> bool:
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return False
        if not (self.resolved_impl == "ring" and self._strip_path()):
            return False
        # Hooks (bench counters, BatchNorm calibration) must see every module they watch called.
        from torch.nn.modules import module as _module

        hooked = (
            self._forward_hooks
            or self._forward_pre_hooks
            or bn._forward_hooks
            or bn._forward_pre_hooks
            or _module._global_forward_hooks
            or _module._global_forward_pre_hooks
        )
        return not hooked

    def _folded(self, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The mixing weight with ``bn``'s scale folded into its columns, and ``bn``'s shift, in ``dtype``."""
        parts = [self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        key = (
            tuple(None if t is None else (t._version, t.data_ptr()) for t in parts),
            bn.eps,
            self.weight.device,
            dtype,
        )
        cached = self._fold_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        hi = torch.promote_types(dtype, torch.float32)  # folded in float32 at least
        with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
            scale = torch.rsqrt(bn.running_var.to(hi) + bn.eps)  # type: ignore[union-attr]
            if bn.weight is not None:
                scale = scale * bn.weight.to(hi)
            shift = -bn.running_mean.to(hi) * scale  # type: ignore[union-attr]
            if bn.bias is not None:
                shift = shift + bn.bias.to(hi)
            if self.bias is not None:
                shift = shift + self.bias.to(hi) * scale
            mix = self._mix_layout(self.weight.detach().to(hi))
            folded = ((mix * scale).to(dtype).contiguous(), shift.to(dtype).contiguous())
        self._fold_cache = (key, folded)
        return folded

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        p, span = self.padding, self.dilation * (self.kernel_size - 1)
        h_out = (x.shape[-2] + 2 * p - span - 1) // self.stride + 1
        w_out = (x.shape[-1] + 2 * p - span - 1) // self.stride + 1
        if h_out < 1 or w_out < 1:
            raise ValueError(
                f"input of size {tuple(x.shape[-2:])} is smaller than the kernel's reach {span + 1}"
            )
        return h_out, w_out

    def _forward_strips(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        h_out: int,
        w_out: int,
        *,
        residual: Tensor | None = None,
        relu: bool = False,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        # Without autograd the output is built in row strips whose ring sums stay in cache, mixed
        # by GEMMs that write straight into the output rows (bias fused into the first). Layers
        # with few input channels put the strip's ring sums side by side in one (pixels, R * C_in)
        # buffer and mix them in ONE GEMM of inner size R * C_in: per-ring GEMMs of inner size 3
        # (the RGB stem) run far below the GEMM rate. Wider layers accumulate one GEMM per ring
        # instead: copying the sums into the shared buffer cost more than it saved there
        # (bench/sre_conv.py; README, SRE-Conv speed). The narrowest (the stem) skip the copies:
        # one grouped convolution's channels_last output is the GEMM's input as it stands. Where the C
        # kernel (models/ring_sums.c) builds, float32 and bf16 layers other than the stem take
        # every ring's sums from it, written side by side into one buffer and mixed in one GEMM:
        # the whole network 1.35-2.37x faster than with torch's depthwise sums on Zen 5 (README,
        # Measured). float32 GEMMs of a million multiply-adds and more go to oneDNN
        # (models/_mix_gemm.py, fused bias, residual and ReLU; then one copy into place), and the
        # output comes from a pool of buffers that need no page faults (models/_buffers.py).
        n, dtype = x.shape[0], weight.dtype
        out_dtype = dtype if out_dtype is None else out_dtype
        out = _buffers.empty((n, self.out_channels, h_out, w_out), out_dtype, x.device)
        rows = max(1, min(h_out, self._strip_rows(w_out)))
        c, ring_count = self.in_channels, self.num_rings
        grouped = self._grouped_sums
        kernel = self._use_kernel and not grouped and _ring_kernel.supports(x, dtype)
        fused = kernel or self.in_channels <= _FUSED_MAX_CHANNELS
        if kernel:
            x = x.to(dtype).contiguous(memory_format=torch.channels_last)
            if self._kernel_taps is None:
                self._kernel_taps = _ring_kernel.taps(self.basis, self.dilation)
        buf = None
        if fused and not grouped:
            buf = torch.empty((rows * w_out, ring_count * c), dtype=dtype, device=x.device)
        # Output in another dtype: each strip is computed in `scratch` and cast into place in cache.
        scratch = None
        if out_dtype != dtype:
            scratch = torch.empty((rows * w_out, self.out_channels), dtype=dtype, device=x.device)
        for i in range(n):
            out_hwc = out[i].permute(1, 2, 0)  # a view: out is channels_last
            res_hwc = None if residual is None else residual[i].permute(1, 2, 0)
            for y0 in range(0, h_out, rows):
                y1 = min(h_out, y0 + rows)
                target = out_hwc[y0:y1].view(-1, self.out_channels)
                strip = target if scratch is None else scratch[: target.shape[0]]
                # With a residual the first GEMM accumulates onto it, and the bias follows.
                first = bias if res_hwc is None else res_hwc[y0:y1].reshape(-1, self.out_channels)
                if buf is None and not grouped:
                    self._ring_rows_into(x[i : i + 1], y0, y1, strip, weight, first)
                else:
                    if kernel:
                        sums = buf[: (y1 - y0) * w_out]  # type: ignore[index]
                        _ring_kernel.ring_sums(
                            x[i].permute(1, 2, 0), sums, y0, y1, w_out, self.stride, self.padding,
                            self._kernel_taps,  # type: ignore[arg-type]
                        )  # fmt: skip
                    elif grouped:
                        sums = self._grouped_ring_sums(x[i : i + 1], y0, y1, dtype)
                    else:
                        sums = buf[: (y1 - y0) * w_out]  # type: ignore[index]
                        by_ring = sums.view(y1 - y0, w_out, ring_count, c)
                        for r, ring in self._ring_strips(x[i : i + 1], y0, y1):
                            # copy_ also casts: under autocast the depthwise sums may be in another dtype.
                            by_ring[:, :, r].copy_(ring[0].permute(1, 2, 0))
                    # Every ring mixed in one GEMM of inner size R x C_in.
                    if self._use_onednn and _mix_gemm.usable(sums, weight):
                        res = None if res_hwc is None else first
                        mixed = _mix_gemm.mix(sums, weight, bias, res, relu)
                        if mixed is not None:
                            target.copy_(mixed)  # casts to out_dtype too, in cache
                            continue
                    if first is None:
                        torch.mm(sums, weight, out=strip)
                    else:
                        torch.addmm(first, sums, weight, out=strip)
                if res_hwc is not None and bias is not None:
                    strip.add_(bias)
                if relu:
                    strip.clamp_min_(0)
                if scratch is not None:
                    target.copy_(strip)
        return out

    def _strip_rows(self, w_out: int) -> int:
        # The strip's (pixels, R * C_in) float32 ring sums, or its output rows where those are
        # wider (the RGB stem: 12 sums, 64 outputs a pixel), are held near _STRIP_BYTES.
        per_row = max(1, w_out * max(self.num_rings * self.in_channels, self.out_channels) * 4)
        return max(1, _STRIP_BYTES // per_row)

    def _grouped_ring_sums(self, x: Tensor, y0: int, y1: int, dtype: torch.dtype) -> Tensor:
        """Every ring's sums for output rows ``[y0, y1)`` of one unpadded image as a ``(pixels,
        C_in * R)`` view, channel-major: one grouped convolution with the R ring planes as the
        filters of each channel. Zero padding as in :meth:`_ring_strips`."""
        s, d, p, k = self.stride, self.dilation, self.padding, self.kernel_size
        xs = _input_rows(x, y0 * s - p, (y1 - 1) * s + d * (k - 1) + 1 - p)
        xs = xs.to(dtype).contiguous(memory_format=torch.channels_last)
        key = ("grouped", xs.device, dtype)
        planes = self._dw_cache.get(key)
        if planes is None:
            planes = self.basis.to(xs.device, dtype).repeat(self.in_channels, 1, 1)[:, None].contiguous()
            self._dw_cache[key] = planes
        sums = F.conv2d(xs, planes, None, s, (0, p), d, self.in_channels)
        return sums.permute(0, 2, 3, 1).reshape(-1, self.in_channels * self.num_rings)

    def _ring_sum(self, xp: Tensor, r: int, y0: int, y1: int, w_out: int) -> Tensor:
        """Sums over ring ``r`` of the padded input ``xp`` for output rows ``[y0, y1)``."""
        s, d = self.stride, self.dilation
        plane, offset, identity = self._ring_plan[r]
        reach = d * (plane.shape[-1] - 1) + 1
        top = y0 * s + offset
        xs = xp[:, :, top : (y1 - 1) * s + offset + reach, offset : (w_out - 1) * s + offset + reach]
        if identity:
            return xs[:, :, ::s, ::s] if s > 1 else xs
        c = self.in_channels
        return F.conv2d(xs, plane.to(xs.dtype).expand(c, 1, -1, -1), None, s, 0, d, c)

    def _ring_rows(self, xp: Tensor, y0: int, y1: int, w_out: int) -> Tensor:
        """Output rows ``[y0, y1)``, differentiable: 1 x 1 convolutions summed over rings."""
        out = None
        for r in range(self.num_rings):
            ring = self._ring_sum(xp, r, y0, y1, w_out)
            term = F.conv2d(ring, self.weight[:, :, r, None, None], None, 1, 0, 1, self.groups)
            out = term if out is None else out.add_(term)
        return out  # type: ignore[return-value]  # num_rings >= 1

    def _ring_strips(self, x: Tensor, y0: int, y1: int) -> Iterator[tuple[int, Tensor]]:
        """``(r, sums over ring r)`` for output rows ``[y0, y1)`` of one unpadded image.

        Zero padding is applied per strip, only where the strip meets the top or bottom edge, and
        by the depthwise convolution itself at the sides: the rows of a channels_last image are
        contiguous, so no padded copy of the whole map is made.
        """
        s, d, p, c = self.stride, self.dilation, self.padding, self.in_channels
        for r, (plane, offset, identity) in enumerate(self._ring_plan):
            reach = d * (plane.shape[-1] - 1) + 1
            xs = _input_rows(x, y0 * s + offset - p, (y1 - 1) * s + offset + reach - p)
            pw = p - offset
            if identity:
                ring = xs[:, :, ::s, ::s] if s > 1 else xs
                if pw:
                    ring = F.pad(ring, (pw, pw))
            else:
                ring = F.conv2d(xs, self._dw_weight(r, xs), None, s, (0, pw), d, c)
            yield r, ring

    def _ring_rows_into(
        self, x: Tensor, y0: int, y1: int, out2d: Tensor, weight: Tensor, first: Tensor | None
    ) -> None:
        """Output rows ``[y0, y1)`` of one image into ``out2d`` (pixels x C_out), one GEMM per ring;
        ``first`` (a bias row or a residual strip) is added by the first."""
        c = self.in_channels
        for r, ring in self._ring_strips(x, y0, y1):
            ring2d = ring.permute(0, 2, 3, 1).reshape(-1, c).to(out2d.dtype)
            w = weight[r * c : (r + 1) * c]  # contiguous rows of the ring-major weight
            if r > 0:
                out2d.addmm_(ring2d, w)
            elif first is None:
                torch.mm(ring2d, w, out=out2d)
            else:
                torch.addmm(first, ring2d, w, out=out2d)

    def _mix_layout(self, weight: Tensor) -> Tensor:
        """The ``(C_out, C_in, R)`` parameter as the strip GEMM's ``(R * C_in, C_out)`` operand: rows
        ring-major (ring, then channel), or channel-major where one grouped convolution takes the
        ring sums (its output channels go channel by channel, ring by ring)."""
        order = (1, 2, 0) if self._grouped_sums else (2, 1, 0)
        return weight.permute(*order).reshape(-1, self.out_channels)

    def _mix_weight(self, dtype: torch.dtype) -> Tensor:
        """The ``(R * C_in, C_out)`` mixing weight in ``dtype`` (layout: :meth:`_mix_layout`).

        Cached until the weights change: per-ring slices of the ``(C_out, C_in, R)`` parameter are
        strided, and every GEMM re-packed them (5 MB per call at 512 channels).
        """
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device, dtype)
        cached = self._mix_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        weight = self._mix_layout(self.weight.detach()).to(dtype).contiguous()
        self._mix_cache = (key, weight)
        return weight

    def _dw_weight(self, r: int, like: Tensor) -> Tensor:
        plane = self._ring_plan[r][0]
        key = (r, like.device, like.dtype)
        cached = self._dw_cache.get(key)
        if cached is None:
            cached = plane.to(like.dtype).expand(self.in_channels, 1, -1, -1).contiguous()
            self._dw_cache[key] = cached
        return cached

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Keep the cropped ring filters on the same device/dtype as the module's buffers.
        result = super()._apply(fn, recurse)
        self._ring_plan = [(fn(plane), offset, ident) for plane, offset, ident in self._ring_plan]
        self._dense_cache = None
        self._dw_cache = {}
        self._mix_cache = None
        self._fold_cache = None
        return result

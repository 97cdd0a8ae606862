"""SRENet-18: a ResNet-18 built from SRE-Convs, exactly equivariant to the square's symmetries.

Du et al., "SRE-Conv: Symmetric Rotation Equivariant Convolution for Biomedical Image
Classification", ISBI 2025 (arXiv:2501.09753); topology of the reference ``sre_resnet18``:

* SRE stem (stride 1, no max-pool), BatchNorm, ReLU;
* four stages of two BasicBlocks; a stage that halves resolution does it as ``AvgPool2d(2)``
  followed by a stride-1 SRE-Conv, and its shortcut is ``AvgPool2d(2) -> 1x1 conv -> BN``;
* global average pool and a linear head.

Every piece is equivariant to rotations by multiples of 90 degrees and to flips (SRE-Convs are
radial; 1 x 1 convs, BatchNorm, ReLU and 2 x 2 average pooling on even sides commute with the
grid's symmetries), so ``features(rot90(x)) == rot90(features(x))`` for inputs whose sides are
multiples of 8. Feature strides are 1, 2, 4, 8 after stages 1-4.

Option ``antialias`` (off by default, as in the reference) blurs with a fixed binomial filter
before every 2 x 2 average pool (:class:`BlurPool2d`); the filter is odd-length, separable and
symmetric, so the network stays exactly D4-equivariant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equislide.models._backbone import Backbone
from equislide.models._errors import ModelConfigError
from equislide.models._registry import register_model
from equislide.models.sre_conv import Impl, Rings, SREConv2d, autocast_dtype

__all__ = ["BlurPool2d", "SREBasicBlock", "SRENet", "SREStem", "srenet18"]

_BINOMIAL = {3: (1.0, 2.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}


def _antialias_taps(antialias: bool | int) -> int:
    """0 (off), 3 or 5 taps from the ``antialias`` option (``True`` means 3)."""
    if antialias is False or antialias == 0:
        return 0
    if antialias is True:
        return 3
    if isinstance(antialias, int) and antialias in _BINOMIAL:
        return antialias
    raise ModelConfigError(f"antialias={antialias!r} is not one of False, True, 3, 5")


class BlurPool2d(nn.Module):
    """Binomial blur (``taps`` = 3: [1, 2, 1] / 4, or 5: [1, 4, 6, 4, 1] / 16), then ``AvgPool2d(2)``.

    The blur is the low-pass half of anti-aliased downsampling (Zhang, "Making Convolutional
    Networks Shift-Invariant Again", ICML 2019): a 2 x 2 mean alone lets fine texture alias into
    the half-resolution map, where it changes with the sub-pixel phase of the input, i.e. with any
    rotation that is not a multiple of 90 degrees. An odd, symmetric kernel with reflect padding
    commutes with every D4 element on any side; the 2 x 2 pool does on even sides.
    """

    def __init__(self, taps: int = 3) -> None:
        super().__init__()
        if taps not in _BINOMIAL:
            raise ModelConfigError(f"taps={taps!r} is not one of {sorted(_BINOMIAL)}")
        t = torch.tensor(_BINOMIAL[taps])
        t = t / t.sum()
        self.taps = taps
        # Fixed, not learned: kept out of state_dict so checkpoints hold the same tensors either way.
        self.register_buffer("kernel", torch.outer(t, t)[None, None], persistent=False)
        self.pool = nn.AvgPool2d(2)

    def extra_repr(self) -> str:
        return f"taps={self.taps}"

    def forward(self, x: Tensor) -> Tensor:
        p = self.taps // 2
        c = x.shape[1]
        x = F.pad(x, (p, p, p, p), mode="reflect")
        x = F.conv2d(x, self.kernel.to(x.dtype).expand(c, 1, -1, -1), groups=c)
        return self.pool(x)


def _downsampler(taps: int) -> nn.Module:
    return BlurPool2d(taps) if taps else nn.AvgPool2d(2)


class SREBasicBlock(nn.Module):
    """Two SRE-Convs with BatchNorm and a residual; ``downsample`` halves the resolution first."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        downsample: bool = False,
        rings: Rings = "hard",
        impl: Impl = "auto",
        antialias: int = 0,
    ) -> None:
        super().__init__()
        self.pool = _downsampler(antialias) if downsample else nn.Identity()
        self.conv1 = SREConv2d(in_channels, out_channels, kernel_size, rings=rings, impl=impl)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = SREConv2d(out_channels, out_channels, kernel_size, rings=rings, impl=impl)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if downsample or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                _downsampler(antialias) if downsample else nn.Identity(),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # relu(bn2(conv2(relu(bn1(conv1(pool(x)))))) + shortcut(x)); forward_bn folds each
        # BatchNorm, the ReLUs and the residual into the SRE-Convs' GEMMs at inference.
        out = self.conv1.forward_bn(self.pool(x), self.bn1, relu=True)
        return self.conv2.forward_bn(out, self.bn2, residual=self.shortcut(x), relu=True)


class SREStem(nn.Sequential):
    """``Sequential(SREConv2d, BatchNorm2d, ReLU)``, run as one :meth:`SREConv2d.forward_bn`.

    Under autocast the stem computes in float32, on its input rounded to the grid on which float32
    sums its rings exactly (:meth:`SREConv2d.on_exact_sum_grid`), and hands on its output in
    autocast's dtype.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        conv, bn, _relu = self
        dtype = autocast_dtype(x)
        if dtype is None:
            return conv.forward_bn(x, bn, relu=True)
        # Rounding the stem to bf16 (the input pixels, and the ring sums of up to 16 of them) was
        # most of the bf16 error at layer 4 (rms 1.1e-1 relative to fp32 with it, 4.3e-2 without)
        # and moved 0.74 % of the tissue labels (0.22 % without). The grid keeps the 90-degree
        # property bit-exact: float32 sums of arbitrary floats depend on the order of the taps,
        # which a rotation changes. Three input channels make the stem a small share of the work.
        with torch.autocast(x.device.type, enabled=False):
            x = conv.on_exact_sum_grid(x.float())
            return conv.forward_bn(x, bn, relu=True, out_dtype=dtype)


class SRENet(Backbone):
    """ResNet-18-shaped network of SRE-Convs.

    Args:
        num_classes: Classifier outputs (9 for NCT-CRC-HE-100K).
        kernel_sizes: SRE kernel side of each of the four stages.
        stem_kernel: SRE kernel side of the stem.
        rings: ``"hard"`` or ``"soft"`` rings in every SRE-Conv.
        width: Channels of stage 1 (doubled at each later stage).
        impl: ``"auto"``, ``"dense"`` or ``"ring"`` for every SRE-Conv.
        in_chans: Input channels.
        antialias: Blur before every 2 x 2 pool (:class:`BlurPool2d`): ``False``/0 (off, the
            reference), ``True``/3 ([1, 2, 1] / 4) or 5 ([1, 4, 6, 4, 1] / 16).
    """

    def __init__(
        self,
        *,
        num_classes: int = 9,
        kernel_sizes: tuple[int, int, int, int] = (9, 9, 5, 5),
        stem_kernel: int = 7,
        rings: Rings = "hard",
        width: int = 64,
        impl: Impl = "auto",
        in_chans: int = 3,
        antialias: bool | int = False,
    ) -> None:
        super().__init__()
        taps = _antialias_taps(antialias)
        kernel_sizes = tuple(int(k) for k in kernel_sizes)  # type: ignore[assignment]
        if len(kernel_sizes) != 4:
            raise ModelConfigError(f"kernel_sizes={kernel_sizes!r} needs one odd size per stage (4 values)")
        if width < 1:
            raise ModelConfigError(f"width={width!r} must be a positive int")
        self.config = {
            "arch": "srenet18",
            "num_classes": num_classes,
            "kernel_sizes": list(kernel_sizes),
            "stem_kernel": stem_kernel,
            "rings": rings,
            "width": width,
            "impl": impl,
            "in_chans": in_chans,
            "antialias": taps,
        }
        widths = (width, 2 * width, 4 * width, 8 * width)
        self.feature_channels = widths
        self.feature_strides = (1, 2, 4, 8)
        self.stem = SREStem(
            SREConv2d(in_chans, width, stem_kernel, rings=rings, impl=impl),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = width
        for i, (out_ch, k) in enumerate(zip(widths, kernel_sizes, strict=True)):
            stages.append(
                nn.Sequential(
                    SREBasicBlock(in_ch, out_ch, k, downsample=i > 0, rings=rings, impl=impl, antialias=taps),
                    SREBasicBlock(out_ch, out_ch, k, rings=rings, impl=impl),
                )
            )
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = nn.Linear(widths[-1], num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def _prepare(self, x: Tensor) -> Tensor:
        # The ring path runs NHWC; converting once here saves a layout copy in every layer.
        return x.contiguous(memory_format=torch.channels_last)


@register_model
def srenet18(
    num_classes: int = 9,
    kernel_sizes: tuple[int, int, int, int] = (9, 9, 5, 5),
    stem_kernel: int = 7,
    rings: Rings = "hard",
    width: int = 64,
    impl: Impl = "auto",
    in_chans: int = 3,
    antialias: bool | int = False,
) -> SRENet:
    """SRENet-18 with the reference's defaults (about 4.0 M parameters for 9 classes)."""
    return SRENet(
        num_classes=num_classes,
        kernel_sizes=kernel_sizes,
        stem_kernel=stem_kernel,
        rings=rings,
        width=width,
        impl=impl,
        in_chans=in_chans,
        antialias=antialias,
    )

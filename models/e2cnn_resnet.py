"""E2CNN ResNet-18: the group-convolution baseline, equivariant by construction.

Weiler and Cesa, "General E(2)-Equivariant Steerable CNNs", NeurIPS 2019 (arXiv:1911.08251), via
their library e2cnn 0.2.3 (github.com/QUVA-Lab/e2cnn; the optional extra ``baselines``). The
topology is that of :mod:`equislide.models.resnet`, every layer replaced by its steerable
counterpart on *regular* fields of a finite group G:

* stem: 7 x 7 ``R2Conv`` from ``in_chans`` trivial (scalar) fields, 2 x 2 downsampling,
  ``InnerBatchNorm``, ``ReLU`` (no max-pool, as in the ResNet baseline);
* four stages of two basic blocks; stages 2-4 halve the resolution in their first conv (conv,
  2 x 2 downsampling, ``InnerBatchNorm``, ``ReLU``), and a block whose shape changes has a
  2 x 2 downsampling + 1 x 1 ``R2Conv`` + ``InnerBatchNorm`` shortcut;
* ``features(x, layer)`` group-pools each field (max over its |G| channels), so it returns plain,
  G-invariant-per-pixel maps with one channel per field; the head averages the pooled layer-4 map
  and applies a linear layer.

Groups: ``"C8"`` (rotations by 45 degrees, ``Rot2dOnR2(8)``) and ``"D4"`` (the square's
symmetries, ``FlipRot2dOnR2(4)``). D4 acts exactly on the pixel grid, so its blocks use the ResNet's
3 x 3 kernels. C8's 45-degree rotations do not map a 3 x 3 grid onto itself; e2cnn's authors
recommend 5 x 5 kernels for rotation groups, and C8 blocks use those (the stem is 7 x 7 for both).
C8 contains the rotations by 90 degrees but no flips.

The default group is D4, the symmetry group SRENet is exact for, so the rotation study compares
networks with the same exact symmetries. It is also the stronger baseline there: on a real H&E image
(``he-carcinoma-1000``, untrained, BatchNorm recalibrated, layer 4, 3 clusters) D4 kept Cohen's
kappa 0.77 / 0.74 at 30 / 60 degrees at 512 px (0.56 / 0.52 at 256 px), C8 0.61 / 0.61
(0.16 / 0.18), and it runs in about 0.7 of C8's time.

Downsampling (option ``downsample``; feature strides 2, 4, 8, 16 in every layout):

* ``"pool"`` (default): a stride-1 ``R2Conv`` followed by ``PointwiseAvgPool(2)``, the 2 x 2 mean
  SRENet downsamples with. On a side divisible by 2, the mean's windows tile the map and every
  rotation by 90 degrees and flip maps them onto each other, so the network is *exactly*
  equivariant (to float rounding; D4: all 8 symmetries, C8: the 4 rotations) at layer L whenever
  the side is a multiple of ``2 ** L``: 256, 512, 272 at every layer, 856 up to layer 3. Feature
  pixel ``j`` is then the mean over input pixels ``[j s, (j + 1) s)`` of the map before it, the
  grid SRENet's features and the service's upsampling (each feature pixel repeated ``s`` times,
  or bilinear about ``j s + (s - 1) / 2``) assume.
* ``"blurpool"``: the same, with e2cnn's anti-aliasing Gaussian (``PointwiseAvgPoolAntialiased``,
  sigma 0.66, 5 x 5) applied at stride 1 before the 2 x 2 mean. e2cnn's module itself blurs and
  samples in one stride-2 conv, which starts at the first pixel: that is the asymmetric grid of
  ``"stride"`` again, so it is not used as such. Exact on the same sides as ``"pool"``.
* ``"stride"``: stride-2 ``R2Conv`` layers, as in e2cnn's wide-ResNet example and in this module
  before the option existed (its checkpoints need ``"downsample": "stride"`` in their config). See
  the first warning.

Pooling adds no parameters. Default widths (regular fields in stage 1, doubled per stage) are chosen
for parameter parity with ``resnet18()`` (11,181,129 parameters for 9 classes): C8 uses 20 fields
(10,629,529 parameters, -4.9 %), D4 uses 28 fields (11,485,497, +2.7 %); measured with e2cnn 0.2.3.
The expanded filters have |G| = 8 channels per field, so a forward pass costs 12 (D4) to 17 (C8)
times a ResNet-18's multiply-adds with ``"stride"``; ``"pool"`` runs the stem and the three
downsampling convs at the higher resolution (the shortcuts pool first and cost nothing extra),
1.2-1.3 times that: ``features(x, 4)`` of a 256 px image on one thread took C8 3.8 s -> 4.7 s,
D4 2.5 s -> 3.3 s (``"blurpool"`` 4.8 s, 3.5 s). In eval mode the cached filters take 0.55 GB
(D4) to 0.77 GB (C8) of float32.
Building a default-width model takes e2cnn 15-45 s on two CPU cores (its per-weight bookkeeping in
Python); the generalized He initialisation is computed here per block, which in e2cnn's own
per-weight form would add over a minute.

.. warning::

    With ``downsample="stride"``, stride-2 convolutions sample every second pixel, starting at the
    first. ``rot90`` and flips map that sampling grid onto itself only if ``H - 1`` and ``W - 1``
    are multiples of the total stride (16 at layer 4: sides 33, 49, 65, ...); on the even sides
    the service uses (256, 512, 856, ...) the features are equivariant only up to a one-pixel
    shift of the sampling grid at each stride-2 layer (measured: Cohen's kappa 0.51-0.76 at 90
    degrees on real H&E), and feature pixel ``j`` is centred on input pixel ``j s``, half a stride
    off the grid above. Padding to an odd side cannot repair it: an even side needs an odd total
    padding, which is asymmetric. In every layout, equivariance off multiples of 90 degrees (C8's
    45 degrees) is approximate: the filters are sampled on a square grid.

.. warning::

    In eval mode e2cnn caches the expanded filter of every ``R2Conv``. This module keeps those caches
    out of ``state_dict()`` (so checkpoints do not depend on the mode they were saved in) and
    refreshes them after ``load_state_dict``; after editing ``weights`` by hand in eval mode, call
    ``.train()`` then ``.eval()`` to refresh them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from equislide.models._backbone import Backbone
from equislide.models._errors import ModelConfigError, OptionalDependencyError
from equislide.models._registry import register_model

if TYPE_CHECKING:
    from e2cnn import nn as enn

__all__ = ["E2CNNResNet", "E2BasicBlock", "e2cnn_resnet18"]

#: Default stage-1 fields per group, for about ResNet-18's parameter count (see module docstring).
DEFAULT_WIDTHS = {"C8": 20, "D4": 28}
#: Kernel side of the blocks' convolutions per group (see module docstring).
BLOCK_KERNELS = {"C8": 5, "D4": 3}
_STEM_KERNEL = 7
#: How a layer halves the resolution (the ``downsample`` option; see the module docstring).
DOWNSAMPLING = ("pool", "blurpool", "stride")
#: Standard deviation (input pixels of the layer) of the Gaussian of ``"blurpool"``, e2cnn's own
#: choice in its examples (``PointwiseAvgPoolAntialiased(sigma=0.66)``: a 5 x 5 filter).
BLUR_SIGMA = 0.66


def _import_e2cnn() -> Any:
    try:
        import e2cnn
    except ImportError:
        raise OptionalDependencyError("the E2CNN baseline", "baselines", "e2cnn") from None
    from equislide.models._e2cnn_compat import ensure_e2cnn_numpy2_compat

    ensure_e2cnn_numpy2_compat()
    return e2cnn


def _pool(ftype: enn.FieldType, mode: str | None) -> enn.EquivariantModule:
    """The 2 x 2 downsampling that follows a stride-1 conv, or the identity (no pooling, or stride-2)."""
    from e2cnn import nn as enn

    if mode is None or mode == "stride":
        return enn.IdentityModule(ftype)
    box = enn.PointwiseAvgPool(ftype, 2)
    if mode == "pool":
        return box
    # e2cnn's antialiased pool blurs and samples in one stride-2 conv, whose odd filter starts at
    # the first pixel: the asymmetric grid again. Blurring at stride 1 (symmetric zero padding,
    # same size), then taking the 2 x 2 mean keeps the low-pass (the Gaussian smeared by the box,
    # 6 x 6) and centres it between pixels.
    blur = enn.PointwiseAvgPoolAntialiased(ftype, sigma=BLUR_SIGMA, stride=1)
    # A constant of the architecture: keep it out of state_dict, as SRENet's BlurPool2d does.
    blur.register_buffer("filter", blur.filter, persistent=False)
    return enn.SequentialModule(blur, box)


def _gspace(group: str) -> Any:
    from e2cnn import gspaces

    if group == "C8":
        return gspaces.Rot2dOnR2(8)
    if group == "D4":
        return gspaces.FlipRot2dOnR2(4)
    raise ModelConfigError(f"group={group!r} is not supported; use 'C8' or 'D4'")


class E2BasicBlock(nn.Module):
    """ResNet basic block on regular fields; maps a ``GeometricTensor`` to a ``GeometricTensor``.

    Args:
        in_type: Field type of the input.
        out_type: Field type of the output.
        kernel_size: Side of both 3 x 3 (or 5 x 5) convolutions.
        downsample: ``None`` keeps the resolution; otherwise the block halves it the way the network
            was configured (see :data:`DOWNSAMPLING`): ``"pool"`` / ``"blurpool"`` run ``conv1`` at
            stride 1 and pool its output, ``"stride"`` runs ``conv1`` at stride 2.
    """

    def __init__(
        self,
        in_type: enn.FieldType,
        out_type: enn.FieldType,
        kernel_size: int,
        *,
        downsample: str | None = None,
    ) -> None:
        super().__init__()
        from e2cnn import nn as enn

        pad = kernel_size // 2
        stride = 2 if downsample == "stride" else 1
        self.conv1 = enn.R2Conv(
            in_type, out_type, kernel_size, padding=pad, stride=stride, bias=False, initialize=False
        )
        # Pool conv1's output (as e2cnn's examples do) rather than its input (as SRENet does): the
        # conv keeps the ResNet's view of the full-resolution map; measured, the two agree within
        # 0.01 of Cohen's kappa off 90 degrees, and pooling first would cost 1/4 of conv1.
        self.pool1 = _pool(out_type, downsample)
        self.bn1 = enn.InnerBatchNorm(out_type)
        self.relu1 = enn.ReLU(out_type, inplace=True)
        self.conv2 = enn.R2Conv(out_type, out_type, kernel_size, padding=pad, bias=False, initialize=False)
        self.bn2 = enn.InnerBatchNorm(out_type)
        self.relu2 = enn.ReLU(out_type, inplace=True)
        if downsample is not None or in_type != out_type:
            # Pooling before the 1 x 1 conv is the same map as after it (both are linear and one acts
            # per pixel, the other per channel), on 4 x fewer pixels.
            self.shortcut: nn.Module = enn.SequentialModule(
                _pool(in_type, downsample),
                enn.R2Conv(in_type, out_type, 1, stride=stride, bias=False, initialize=False),
                enn.InnerBatchNorm(out_type),
            )
        else:
            self.shortcut = enn.IdentityModule(in_type)

    def forward(self, x: enn.GeometricTensor) -> enn.GeometricTensor:
        out = self.relu1(self.bn1(self.pool1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class E2CNNResNet(Backbone):
    """ResNet-18 of e2cnn steerable convolutions on regular fields of C8 or D4.

    Args:
        group: ``"D4"`` (default) or ``"C8"``.
        num_classes: Classifier outputs.
        width: Regular fields in stage 1 (doubled at each later stage); ``None`` picks
            :data:`DEFAULT_WIDTHS` for the group.
        in_chans: Input channels (each a trivial field).
        downsample: How the stem and stages 2-4 halve the resolution, one of :data:`DOWNSAMPLING`:
            ``"pool"`` (default), a stride-1 conv followed by a 2 x 2 mean; ``"blurpool"``, the same
            with e2cnn's Gaussian blur (sigma :data:`BLUR_SIGMA`) before the mean; ``"stride"``, the
            stride-2 convs of the original layout (exact only on sides 16k + 1; see the warning).

    Raises:
        OptionalDependencyError: e2cnn is not installed.
        ModelConfigError: unknown group or non-positive width.
    """

    def __init__(
        self,
        *,
        group: str = "D4",
        num_classes: int = 9,
        width: int | None = None,
        in_chans: int = 3,
        downsample: str = "pool",
    ) -> None:
        super().__init__()
        _import_e2cnn()
        from e2cnn import nn as enn

        gspace = _gspace(group)
        if width is not None and (not isinstance(width, int) or width < 1):
            raise ModelConfigError(
                f"width={width!r} must be a positive int (regular fields in stage 1) or None"
            )
        if downsample not in DOWNSAMPLING:
            raise ModelConfigError(f"downsample={downsample!r} is not one of {', '.join(DOWNSAMPLING)}")
        self.config = {
            "arch": "e2cnn_resnet18",
            "group": group,
            "num_classes": num_classes,
            "width": width,
            "in_chans": in_chans,
            "downsample": downsample,
        }
        fields = width if width is not None else DEFAULT_WIDTHS[group]
        widths = (fields, 2 * fields, 4 * fields, 8 * fields)
        kernel = BLOCK_KERNELS[group]
        self.group = group
        self.feature_channels = widths
        self.feature_strides = (2, 4, 8, 16)
        self.in_type = enn.FieldType(gspace, in_chans * [gspace.trivial_repr])
        types = [enn.FieldType(gspace, n * [gspace.regular_repr]) for n in widths]

        stem_conv = enn.R2Conv(
            self.in_type,
            types[0],
            _STEM_KERNEL,
            padding=_STEM_KERNEL // 2,
            stride=2 if downsample == "stride" else 1,
            bias=False,
            initialize=False,
        )
        stem = [stem_conv, enn.InnerBatchNorm(types[0]), enn.ReLU(types[0], inplace=True)]
        if downsample != "stride":
            # Pool the conv's output, before BatchNorm: with the conv it is one linear stride-2 map
            # (an 8 x 8 filter centred between pixels), as the stride-2 conv it replaces.
            stem.insert(1, _pool(types[0], downsample))
        self.stem = enn.SequentialModule(*stem)
        stages = []
        in_type = types[0]
        for i, out_type in enumerate(types):
            stages.append(
                nn.Sequential(
                    E2BasicBlock(in_type, out_type, kernel, downsample=None if i == 0 else downsample),
                    E2BasicBlock(out_type, out_type, kernel),
                )
            )
            in_type = out_type
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.group_pool = nn.ModuleList(enn.GroupPooling(t) for t in types)
        self.head = nn.Linear(widths[-1], num_classes)
        self._r2convs = [m for m in self.modules() if isinstance(m, enn.R2Conv)]
        with torch.no_grad():
            for conv in self._r2convs:
                # The distribution of e2cnn's generalized_he_init, which R2Conv(initialize=False) skips.
                conv.weights.copy_(_generalized_he_std(conv) * torch.randn_like(conv.weights))
        self._keep_filter_caches_out_of_state_dict()
        self.register_load_state_dict_post_hook(_refresh_filter_caches)

    def features(self, x: Tensor, layer: int = 4) -> Tensor:
        """Group-pooled feature map after stage ``layer``.

        Args:
            x: Images ``(N, in_chans, H, W)``.
            layer: Stage 1-4.

        Returns:
            ``(N, feature_channels[layer - 1], H / s, W / s)`` with ``s = feature_strides[layer - 1]``
            (rounded down for sides not divisible by ``s``; rounded up with ``downsample="stride"``):
            the per-field maximum over the group, hence invariant per pixel, and equivariant as a
            map (see the module docstring for the sizes where exact).
        """
        if layer not in (1, 2, 3, 4):
            raise ModelConfigError(f"layer={layer!r} is not a stage of this backbone; use 1, 2, 3 or 4")
        return self.forward_intermediates(x, (layer,))[0]

    def forward_intermediates(self, x: Tensor, indices: tuple[int, ...] = (1, 2, 3, 4)) -> list[Tensor]:
        """Group-pooled feature maps after each stage in ``indices`` (1-4), from one pass."""
        bad = [i for i in indices if i not in (1, 2, 3, 4)]
        if bad or not indices:
            raise ModelConfigError(f"indices={indices!r} must be stages among 1, 2, 3, 4")
        if x.ndim != 4 or x.shape[1] != self.in_type.size:
            raise ModelConfigError(
                f"input of shape {tuple(x.shape)} does not fit; expected (N, {self.in_type.size}, H, W)"
            )
        from e2cnn import nn as enn

        # Backbone's versions run the stages on plain tensors; e2cnn modules need GeometricTensors.
        g = self.stem(enn.GeometricTensor(x, self.in_type))
        out = []
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)[: max(indices)], 1):
            g = stage(g)
            if i in indices:
                out.append(self.group_pool[i - 1](g).tensor)
        return out

    def train(self, mode: bool = True) -> E2CNNResNet:
        # R2Conv.train(False) expands and caches its filter; without no_grad the cache would keep an
        # autograd graph alive (and could not be deep-copied).
        with torch.no_grad():
            super().train(mode)
        self._keep_filter_caches_out_of_state_dict()
        return self

    def _keep_filter_caches_out_of_state_dict(self) -> None:
        # e2cnn registers its filter cache as a persistent buffer (zeros at init, real in eval,
        # absent in train), so state_dict keys would depend on the module's mode history.
        for conv in self._r2convs:
            for name in ("filter", "expanded_bias"):
                cache = getattr(conv, name, None)
                if isinstance(cache, Tensor):
                    conv.register_buffer(name, cache, persistent=False)


def _refresh_filter_caches(module: nn.Module, incompatible_keys: Any) -> None:
    # Loaded weights make an eval-mode filter cache stale; rebuild it from them.
    if module.training:
        return
    with torch.no_grad():
        for conv in module._r2convs:  # type: ignore[attr-defined]
            conv.filter, bias = conv.expand_parameters()
            if bias is not None:
                conv.expanded_bias = bias


def _generalized_he_std(conv: enn.R2Conv) -> Tensor:
    """Per-weight std of e2cnn's ``generalized_he_init``, computed per block instead of per weight.

    e2cnn's version walks every weight's attribute dict in Python (minutes for a full-width
    network); for convs between homogeneous field types every (output field, input field) block
    has the same basis, so the std of a weight depends only on its position in the block:
    ``1 / sqrt(#distinct input irreps feeding its output irrep * #basis elements from its input
    irrep to that output irrep over all input fields)``. Weights are laid out (out field, in field,
    block element), as in e2cnn's ``BlocksBasisExpansion``.
    """
    from e2cnn.nn.init import _generalized_he_init_variances

    expansion = conv.basisexpansion
    pairs = expansion._representations_pairs
    if len(pairs) != 1:  # mixed field types: use e2cnn's own (slow) computation
        return _generalized_he_init_variances(expansion)
    block = getattr(expansion, f"block_expansion_{pairs[0]}")
    info = list(block.get_basis_info())
    n_in, n_out = len(conv.in_type), len(conv.out_type)
    sources: dict[int, set[str]] = {}
    counts: dict[tuple[int, str], int] = {}
    for attr in info:
        j, irrep = attr["out_irrep_idx"], attr["in_irrep"]
        sources.setdefault(j, set()).add(irrep)
        counts[j, irrep] = counts.get((j, irrep), 0) + n_in
    std = torch.tensor(
        [(len(sources[a["out_irrep_idx"]]) * counts[a["out_irrep_idx"], a["in_irrep"]]) ** -0.5 for a in info]
    )
    return std.repeat(n_out * n_in)


def _create_e2cnn_resnet(**kwargs: Any) -> E2CNNResNet:
    return E2CNNResNet(**kwargs)


@register_model
def e2cnn_resnet18(
    group: str = "D4",
    num_classes: int = 9,
    width: int | None = None,
    in_chans: int = 3,
    downsample: str = "pool",
) -> E2CNNResNet:
    """E2CNN ResNet-18 on D4 (default) or C8 regular fields (11.5 M / 10.6 M parameters for 9 classes).

    Raises:
        OptionalDependencyError: e2cnn is not installed (``pip install 'equislide[baselines]'``).
    """
    return _create_e2cnn_resnet(
        group=group, num_classes=num_classes, width=width, in_chans=in_chans, downsample=downsample
    )

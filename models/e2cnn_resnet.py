"""E2CNN ResNet-18: the group-convolution baseline, equivariant by construction.

Weiler and Cesa, "General E(2)-Equivariant Steerable CNNs", NeurIPS 2019 (arXiv:1911.08251), via
their library e2cnn 0.2.3 (github.com/QUVA-Lab/e2cnn; the optional extra ``baselines``). The
topology is that of :mod:`equislide.models.resnet`, every layer replaced by its steerable
counterpart on *regular* fields of a finite group G:

* stem: 7 x 7 stride-2 ``R2Conv`` from ``in_chans`` trivial (scalar) fields, ``InnerBatchNorm``,
  ``ReLU`` (no max-pool, as in the ResNet baseline);
* four stages of two basic blocks; stages 2-4 halve the resolution with a stride-2 first conv, and a
  block whose shape changes has a 1 x 1 ``R2Conv`` + ``InnerBatchNorm`` shortcut;
* ``features(x, layer)`` group-pools each field (max over its |G| channels), so it returns plain,
  G-invariant-per-pixel maps with one channel per field; the head averages the pooled layer-4 map
  and applies a linear layer.

Groups: ``"C8"`` (rotations by 45 degrees, ``Rot2dOnR2(8)``) and ``"D4"`` (the square's
symmetries, ``FlipRot2dOnR2(4)``). D4 acts exactly on the pixel grid, so its blocks use the ResNet's
3 x 3 kernels. C8's 45-degree rotations do not map a 3 x 3 grid onto itself; e2cnn's authors
recommend 5 x 5 kernels for rotation groups, and C8 blocks use those (the stem is 7 x 7 for both).

Default widths (regular fields in stage 1, doubled per stage) are chosen for parameter parity with
``resnet18()`` (11,181,129 parameters for 9 classes): C8 uses 20 fields (10,629,529 parameters,
-4.9 %), D4 uses 28 fields (11,485,497, +2.7 %); measured with e2cnn 0.2.3. The expanded filters
have |G| = 8 channels per field, so a forward pass costs 12 (D4) to 17 (C8) times a ResNet-18's
multiply-adds, and in eval mode the cached filters take 0.55 GB (D4) to 0.77 GB (C8) of float32.
Building a default-width model takes e2cnn 15-45 s on two CPU cores (its per-weight bookkeeping in
Python); the generalized He initialisation is computed here per block, which in e2cnn's own
per-weight form would add over a minute.

.. warning::

    Stride-2 convolutions sample every second pixel, starting at the first. ``rot90`` and flips map
    that sampling grid onto itself only if ``H - 1`` and ``W - 1`` are multiples of the total
    stride (16 at layer 4: sides 33, 49, 65, ...); for other sizes, e.g. 64, the features are
    equivariant only up to a one-pixel shift of the sampling grid at each stride-2 layer. Off
    multiples of 90 degrees (C8's 45 degrees), equivariance is approximate: the filters are sampled
    on a square grid.

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


def _import_e2cnn() -> Any:
    try:
        import e2cnn
    except ImportError:
        raise OptionalDependencyError("the E2CNN baseline", "baselines", "e2cnn") from None
    from equislide.models._e2cnn_compat import ensure_e2cnn_numpy2_compat

    ensure_e2cnn_numpy2_compat()
    return e2cnn


def _gspace(group: str) -> Any:
    from e2cnn import gspaces

    if group == "C8":
        return gspaces.Rot2dOnR2(8)
    if group == "D4":
        return gspaces.FlipRot2dOnR2(4)
    raise ModelConfigError(f"group={group!r} is not supported; use 'C8' or 'D4'")


class E2BasicBlock(nn.Module):
    """ResNet basic block on regular fields; maps a ``GeometricTensor`` to a ``GeometricTensor``."""

    def __init__(
        self, in_type: enn.FieldType, out_type: enn.FieldType, kernel_size: int, stride: int = 1
    ) -> None:
        super().__init__()
        from e2cnn import nn as enn

        pad = kernel_size // 2
        self.conv1 = enn.R2Conv(
            in_type, out_type, kernel_size, padding=pad, stride=stride, bias=False, initialize=False
        )
        self.bn1 = enn.InnerBatchNorm(out_type)
        self.relu1 = enn.ReLU(out_type, inplace=True)
        self.conv2 = enn.R2Conv(out_type, out_type, kernel_size, padding=pad, bias=False, initialize=False)
        self.bn2 = enn.InnerBatchNorm(out_type)
        self.relu2 = enn.ReLU(out_type, inplace=True)
        if stride != 1 or in_type != out_type:
            self.shortcut: nn.Module = enn.SequentialModule(
                enn.R2Conv(in_type, out_type, 1, stride=stride, bias=False, initialize=False),
                enn.InnerBatchNorm(out_type),
            )
        else:
            self.shortcut = enn.IdentityModule(in_type)

    def forward(self, x: enn.GeometricTensor) -> enn.GeometricTensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class E2CNNResNet(Backbone):
    """ResNet-18 of e2cnn steerable convolutions on regular fields of C8 or D4.

    Args:
        group: ``"C8"`` or ``"D4"``.
        num_classes: Classifier outputs.
        width: Regular fields in stage 1 (doubled at each later stage); ``None`` picks
            :data:`DEFAULT_WIDTHS` for the group.
        in_chans: Input channels (each a trivial field).

    Raises:
        OptionalDependencyError: e2cnn is not installed.
        ModelConfigError: unknown group or non-positive width.
    """

    def __init__(
        self, *, group: str = "C8", num_classes: int = 9, width: int | None = None, in_chans: int = 3
    ) -> None:
        super().__init__()
        _import_e2cnn()
        from e2cnn import nn as enn

        gspace = _gspace(group)
        if width is not None and (not isinstance(width, int) or width < 1):
            raise ModelConfigError(
                f"width={width!r} must be a positive int (regular fields in stage 1) or None"
            )
        self.config = {
            "arch": "e2cnn_resnet18",
            "group": group,
            "num_classes": num_classes,
            "width": width,
            "in_chans": in_chans,
        }
        fields = width if width is not None else DEFAULT_WIDTHS[group]
        widths = (fields, 2 * fields, 4 * fields, 8 * fields)
        kernel = BLOCK_KERNELS[group]
        self.group = group
        self.feature_channels = widths
        self.feature_strides = (2, 4, 8, 16)
        self.in_type = enn.FieldType(gspace, in_chans * [gspace.trivial_repr])
        types = [enn.FieldType(gspace, n * [gspace.regular_repr]) for n in widths]

        self.stem = enn.SequentialModule(
            enn.R2Conv(
                self.in_type,
                types[0],
                _STEM_KERNEL,
                padding=_STEM_KERNEL // 2,
                stride=2,
                bias=False,
                initialize=False,
            ),
            enn.InnerBatchNorm(types[0]),
            enn.ReLU(types[0], inplace=True),
        )
        stages = []
        in_type = types[0]
        for i, out_type in enumerate(types):
            stages.append(
                nn.Sequential(
                    E2BasicBlock(in_type, out_type, kernel, 1 if i == 0 else 2),
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
            (rounded up for odd sides): the per-field maximum over the group, hence invariant per
            pixel, and equivariant as a map (see the module docstring for the sizes where exact).
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
    group: str = "C8", num_classes: int = 9, width: int | None = None, in_chans: int = 3
) -> E2CNNResNet:
    """E2CNN ResNet-18 on C8 or D4 regular fields (10.6 M / 11.5 M parameters for 9 classes by default).

    Raises:
        OptionalDependencyError: e2cnn is not installed (``pip install 'equislide[baselines]'``).
    """
    return _create_e2cnn_resnet(group=group, num_classes=num_classes, width=width, in_chans=in_chans)

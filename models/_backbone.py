"""What every equislide backbone shares: the ``features(x, layer)`` contract and its config."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from equislide.models._errors import ModelConfigError

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """Base class of the ResNet-18-shaped backbones.

    Subclasses set ``stem``, ``layer1`` .. ``layer4``, ``head``, ``feature_strides`` (input pixels
    per feature pixel after each stage), ``feature_channels`` and ``config`` (the keyword arguments
    that rebuild the model, plus ``arch``; stored in checkpoints).
    """

    stem: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module
    head: nn.Linear
    feature_strides: tuple[int, int, int, int]
    feature_channels: tuple[int, int, int, int]
    config: dict[str, Any]

    def features(self, x: Tensor, layer: int = 4) -> Tensor:
        """Feature map after stage ``layer``.

        Args:
            x: Images ``(N, 3, H, W)``.
            layer: Stage 1-4.

        Returns:
            ``(N, feature_channels[layer - 1], H / s, W / s)`` with ``s = feature_strides[layer - 1]``.
        """
        if layer not in (1, 2, 3, 4):
            raise ModelConfigError(f"layer={layer!r} is not a stage of this backbone; use 1, 2, 3 or 4")
        x = self._prepare(x)
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[:layer]:
            x = stage(x)
        return x

    def forward_intermediates(self, x: Tensor, indices: tuple[int, ...] = (1, 2, 3, 4)) -> list[Tensor]:
        """Feature maps after each stage in ``indices`` (1-4), from one pass through the network."""
        bad = [i for i in indices if i not in (1, 2, 3, 4)]
        if bad or not indices:
            raise ModelConfigError(f"indices={indices!r} must be stages among 1, 2, 3, 4")
        x = self.stem(self._prepare(x))
        out = []
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)[: max(indices)], 1):
            x = stage(x)
            if i in indices:
                out.append(x)
        return out

    def _prepare(self, x: Tensor) -> Tensor:
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Layer-4 feature map."""
        return self.features(x, 4)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool, then the linear classifier unless ``pre_logits``."""
        x = x.mean(dim=(-2, -1))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))

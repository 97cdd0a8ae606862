"""BYOL self-distillation (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020) for a backbone.

Written here in a few lines rather than taken from a library: lightly (the well-kept SSL library)
depends on torchvision, whose only wheel for the pinned torch is a CUDA build that does not import
against the CPU torch. BYOL rather than SimCLR because it needs no negatives and so learns with the
small batches (8-32 tiles) a CPU can afford; SimCLR's contrastive loss collapses in quality there.

The online network is ``backbone -> global pool -> projector -> predictor``; the target is an
exponential moving average of ``backbone -> projector`` that gets no gradient. The loss is the
symmetrised ``2 - 2 cos(prediction(view 1), target(view 2))``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BYOL", "PooledFeatures", "mlp"]


def mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )


def _pooled(backbone: nn.Module, x: Tensor) -> Tensor:
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)  # type: ignore[operator]


class PooledFeatures(nn.Module):
    """``backbone``'s globally pooled layer-4 features as a module's forward, so that DDP (which syncs
    the gradients of what its wrapped forward computed) can wrap exactly what BYOL trains."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return _pooled(self.backbone, x)


class BYOL(nn.Module):
    """Online backbone + projector + predictor, and their EMA target.

    Args:
        backbone: The network being trained (its ``head`` is not used).
        feat_dim: Channels of the backbone's pooled layer-4 features.
        hidden: Hidden width of the projector and predictor.
        out: Projection dimension.
        base_momentum: EMA momentum at the first step; it rises to 1 on a cosine over training.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        hidden: int = 512,
        out: int = 128,
        base_momentum: float = 0.99,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feat_dim, hidden, out)
        self.predictor = mlp(out, hidden, out)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in (*self.target_backbone.parameters(), *self.target_projector.parameters()):
            p.requires_grad_(False)
        self.base_momentum = float(base_momentum)

    def online_modules(self) -> list[nn.Module]:
        """The modules the optimiser trains (backbone first)."""
        return [self.backbone, self.projector, self.predictor]

    def online(self) -> nn.Sequential:
        """``view -> prediction``: the whole trained path as one module (what DDP wraps, so that the
        projector's and predictor's gradients are synchronised too). It shares the parameters."""
        return nn.Sequential(PooledFeatures(self.backbone), self.projector, self.predictor)

    def loss(self, view1: Tensor, view2: Tensor, online: nn.Module | None = None) -> Tensor:
        """Symmetrised BYOL loss of two views of one batch.

        ``online``: :meth:`online` or a DDP wrapper of it (default: built here). Both views go through
        the networks as one batch (one BatchNorm batch).
        """
        n = view1.shape[0]
        both = torch.cat([view1, view2])
        p = F.normalize((online or self.online())(both), dim=1)
        with torch.no_grad():
            t = F.normalize(self.target_projector(_pooled(self.target_backbone, both)), dim=1)
        p1, p2 = p[:n], p[n:]
        t1, t2 = t[:n], t[n:]
        return (2 - 2 * (p1 * t2).sum(1)).mean() + (2 - 2 * (p2 * t1).sum(1)).mean()

    @torch.no_grad()
    def update_target(self, progress: float) -> float:
        """EMA step; ``progress`` in [0, 1] is the fraction of training done. Returns the momentum."""
        m = 1 - (1 - self.base_momentum) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2
        for online, target in (
            (self.backbone, self.target_backbone),
            (self.projector, self.target_projector),
        ):
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
            for bo, bt in zip(online.buffers(), target.buffers(), strict=True):
                bt.copy_(bo)
        return m

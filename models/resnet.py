"""ResNet-18 baseline: the plain-convolution network SRENet is compared against.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; as in the SRE-Conv paper's
baseline, torchvision's ``resnet18`` topology with its max-pool replaced by the identity (7 x 7
stride-2 stem, 3 x 3 convs, stride-2 downsampling), so feature strides are 2, 4, 8, 16 after
stages 1-4. It is not rotation equivariant; that is the point of comparing with it.
"""

from __future__ import annotations

from torch import Tensor, nn

from equislide.models._backbone import Backbone
from equislide.models._registry import register_model

__all__ = ["BasicBlock", "ResNet", "resnet18"]


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3 x 3 convs, BatchNorm, residual."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(Backbone):
    """ResNet-18 with the identity in place of the stem's max-pool.

    Args:
        num_classes: Classifier outputs.
        width: Channels of stage 1 (doubled at each later stage).
        in_chans: Input channels.
    """

    def __init__(self, *, num_classes: int = 9, width: int = 64, in_chans: int = 3) -> None:
        super().__init__()
        self.config = {"arch": "resnet18", "num_classes": num_classes, "width": width, "in_chans": in_chans}
        widths = (width, 2 * width, 4 * width, 8 * width)
        self.feature_channels = widths
        self.feature_strides = (2, 4, 8, 16)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Identity(),  # torchvision's max-pool, removed as in the paper's baseline
        )
        stages = []
        in_ch = width
        for i, out_ch in enumerate(widths):
            stages.append(
                nn.Sequential(BasicBlock(in_ch, out_ch, 1 if i == 0 else 2), BasicBlock(out_ch, out_ch))
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


@register_model
def resnet18(num_classes: int = 9, width: int = 64, in_chans: int = 3) -> ResNet:
    """ResNet-18 baseline (11.2 M parameters for 9 classes)."""
    return ResNet(num_classes=num_classes, width=width, in_chans=in_chans)

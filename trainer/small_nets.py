"""Small ResNet-style backbones for low-resolution images on CPUs (the digits quickstart), by name.

Each entry of BACKBONES builds a randomly initialized network that maps (N, 3, H, W) images to (N, feature_dim)
features, like a torchvision ResNet with fc = Identity; `model.base_model` accepts these names too.

The networks are torchvision's ResNet recipe cut down: torchvision's BasicBlock (two 3x3 convs, BN, identity or
1x1-conv shortcut), one block per stage, fewer stages and channels, global average pooling, the same
initialization (Kaiming-normal convs, BN weight 1 and bias 0). At 16 px a ResNet-18 with the small stem spends
most of its work on 256- and 512-channel stages that see 4x4 and 2x2 maps; these stop at 128 or 256 channels.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock


class SmallResNet(nn.Module):
    """stem -> one BasicBlock per entry of `widths` (1 to 4; stride 1 for the first, 2 after) -> global average pool.

    small_stem: 3x3 stride-1 stem conv (images of 8-32 px); otherwise torchvision's 7x7 stride-2 conv and
    3x3 stride-2 max-pool. feature_dim = widths[-1].
    """

    def __init__(self, widths: tuple[int, ...], small_stem: bool = True):
        super().__init__()
        first = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(3, first, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, first, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(first)
        self.relu = nn.ReLU(inplace=True)
        if not 1 <= len(widths) <= 4:
            raise ValueError(f"widths={widths}: one to four stages")
        in_width = first
        # stages named as torchvision's (layer1..layer4, nn.Sequential): activation checkpointing and the memory
        # planner walk those names; stages beyond len(widths) are identities
        for i in range(4):
            if i >= len(widths):
                setattr(self, f"layer{i + 1}", nn.Identity())
                continue
            width, stride = widths[i], 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_width != width:
                downsample = nn.Sequential(nn.Conv2d(in_width, width, kernel_size=1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(in_width, width, stride=stride,
                                                                    downsample=downsample)))
            in_width = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_width
        for m in self.modules():  # torchvision ResNet's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _builder(widths: tuple[int, ...]) -> Callable[[bool], tuple[nn.Module, int]]:
    def build(small_stem: bool) -> tuple[nn.Module, int]:
        net = SmallResNet(widths, small_stem)
        return net, net.feature_dim
    return build


# name -> (small_stem -> (backbone, feature_dim)). The number is the count of weighted layers on the main path
# (stem conv + two convs per block + the linear layer a classifier would add), as in ResNet-18's name.
BACKBONES: dict[str, Callable[[bool], tuple[nn.Module, int]]] = {
    "resnet8": _builder((32, 64, 128)),  # 3 stages, 128 features: ~1/12 of ResNet-18's work at 16 px
    "resnet8_wide": _builder((64, 128, 256)),  # twice the width, ~4x resnet8's work
    "resnet10": _builder((64, 128, 256, 512)),  # ResNet-18's widths, one block per stage, 512 features
}

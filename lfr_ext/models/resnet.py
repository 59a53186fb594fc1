"""CIFAR-style residual networks: ResNet-18, PreAct ResNet-18 and ResNet-20.

"CIFAR-style" means a 3x3 stride-1 stem with no max-pool, so 32x32 (or 28x28) inputs keep
their resolution through the first stage, as in He et al. (2016, section 4.2) and in the
adversarial-training literature (Madry et al., TRADES, Rice et al.). Inputs are in [0, 1]
and not normalised inside the model: attacks and the LFR box constraint act on raw pixels.

Every model maps (B, ``in_channels``, H, W) -> logits (B, ``num_classes``); global average
pooling makes them accept any H, W >= 8 (28x28 MNIST as well as 32x32 CIFAR-10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BatchNorm, default linear (torchvision's scheme)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a 1x1-conv (projection) shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv (He et al., "Identity mappings", 2016); the shortcut taps
    the pre-activated input when it must project."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _StageNet(nn.Module):
    """Stem conv, residual stages, (optional final BN-ReLU), global average pool, linear."""

    def __init__(
        self, block, widths: list[int], depths: list[int], in_channels: int, num_classes: int, preact: bool = False
    ):
        super().__init__()
        self.preact = preact
        self.stem = _conv3x3(in_channels, widths[0])
        # A post-activation net normalises the stem; a pre-activation one leaves that to block 1.
        self.stem_bn = None if preact else nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(cin, width, stride))
                cin = width
        self.blocks = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(cin) if preact else None
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        if self.stem_bn is not None:
            out = F.relu(self.stem_bn(out))
        out = self.blocks(out)
        if self.final_bn is not None:
            out = F.relu(self.final_bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResNet18(_StageNet):
    """ResNet-18, CIFAR-style: 4 stages of 2 BasicBlocks, widths 64-128-256-512 (11.2M params)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__(BasicBlock, [64, 128, 256, 512], [2, 2, 2, 2], in_channels, num_classes)


class PreActResNet18(_StageNet):
    """Pre-activation ResNet-18 (the usual adversarial-training backbone), widths 64-512."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__(PreActBlock, [64, 128, 256, 512], [2, 2, 2, 2], in_channels, num_classes, preact=True)


class ResNet20(_StageNet):
    """ResNet-20 of He et al. (2016) for CIFAR: 3 stages of 3 BasicBlocks, widths 16-32-64
    (0.27M params), the authors' CIFAR-10 model. Shortcuts that change shape are 1x1
    projections (option B) rather than zero padding."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__(BasicBlock, [16, 32, 64], [3, 3, 3], in_channels, num_classes)

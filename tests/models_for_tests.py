"""Small models that exercise what LFR must handle: BatchNorm, Dropout, frozen layers."""

import torch
from torch import nn


class BNNet(nn.Module):
    """conv-BN-ReLU-pool, a residual block with BatchNorm, Dropout, linear head. (B, 1, 8, 8) -> (B, 3)."""

    def __init__(self, drop: float = 0.25):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block_conv = nn.Conv2d(4, 4, 3, padding=1)
        self.block_bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        t = torch.relu(self.bn(self.conv(x)))
        t = torch.relu(t + self.block_bn(self.block_conv(t)))
        return self.head(self.drop(self.pool(t).flatten(1)))


class SmoothNet(nn.Module):
    """Tiny smooth MLP for gradcheck/gradgradcheck: (B, 6) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))

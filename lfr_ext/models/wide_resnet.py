"""Wide residual networks (Zagoruyko & Komodakis 2016), the adversarial-training workhorse:
WRN-34-10 (TRADES, MART), WRN-28-10, and with SiLU the RobustBench leaders' choice (Gowal et al.
2021; Wang et al. 2023).

Pre-activation blocks (BN, activation, conv) as in the TRADES code base; depth ``6n + 4`` with
``n`` blocks per stage and widths ``16, 16k, 32k, 64k``. Inputs in [0, 1], not normalised inside
(wrap in :class:`lfr_ext.PixelClassifier` for that). (B, C, H, W) -> (B, classes) for any
H, W >= 8.
"""

from __future__ import annotations

from torch import nn

from .resnet import init_weights

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


class WideBlock(nn.Module):
    """BN-act-conv3x3-BN-act-conv3x3, plus a 1x1-conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, activation: type[nn.Module]):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = activation()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = activation()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``width``; ``activation`` "relu" or "silu"."""

    def __init__(
        self, depth: int = 34, width: int = 10, *, in_channels: int = 3, num_classes: int = 10, activation: str = "relu"
    ):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"a WideResNet has depth 6n + 4 (n >= 1), got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        act = ACTIVATIONS[activation]
        blocks = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers = []
        for stage, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            for i in range(blocks):
                layers.append(WideBlock(cin if i == 0 else cout, cout, 2 if (stage > 0 and i == 0) else 1, act))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.act = act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        out = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(self.pool(out).flatten(1))


def _wide(depth: int, width: int, activation: str):
    def build(*, in_channels: int, num_classes: int) -> WideResNet:
        return WideResNet(depth, width, in_channels=in_channels, num_classes=num_classes, activation=activation)

    build.__name__ = f"WideResNet{depth}_{width}_{activation}"
    return build


__all__ = ["ACTIVATIONS", "WideBlock", "WideResNet"]

"""The authors' MNIST model (the SmallCNN of the TRADES code base that LFR builds on)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


class SmallCNN(nn.Module):
    """conv 32, conv 32, max-pool, conv 64, conv 64, max-pool, fc 200, fc 200, fc ``num_classes``.

    Input (B, ``in_channels``, 28, 28) -> logits (B, ``num_classes``). As in the authors' code,
    one in-place ``nn.ReLU`` module is shared by every layer, Dropout(``drop``) follows fc1,
    convolutions use Kaiming-normal init and, with ``zero_init_last=True`` (the authors'),
    the last layer starts at zero (so the input gradient, and the penalty, start at 0).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, drop: float = 0.5, zero_init_last: bool = True):
        super().__init__()
        activation = nn.ReLU(inplace=True)  # shared on purpose: the authors' model does this
        self.feature_extractor = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 32, 3),
                relu1=activation,
                conv2=nn.Conv2d(32, 32, 3),
                relu2=activation,
                maxpool1=nn.MaxPool2d(2, 2),
                conv3=nn.Conv2d(32, 64, 3),
                relu3=activation,
                conv4=nn.Conv2d(64, 64, 3),
                relu4=activation,
                maxpool2=nn.MaxPool2d(2, 2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(64 * 4 * 4, 200),
                relu1=activation,
                drop=nn.Dropout(drop),
                fc2=nn.Linear(200, 200),
                relu2=activation,
                fc3=nn.Linear(200, num_classes),
            )
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            nn.init.zeros_(self.classifier.fc3.weight)
            nn.init.zeros_(self.classifier.fc3.bias)

    def forward(self, x):
        features = self.feature_extractor(x)
        return self.classifier(features.flatten(1))

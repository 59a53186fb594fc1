"""Models used by the LFR paper and the robustness literature, and a factory by name."""

from __future__ import annotations

from torch import nn

from .modern import ConvNeXtCifar, ViTCifar
from .resnet import PreActResNet18, ResNet18, ResNet20
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet, _wide

MODELS = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "preact_resnet18": PreActResNet18,
    "wrn34_10": _wide(34, 10, "relu"),  # TRADES, MART
    "wrn28_10": _wide(28, 10, "relu"),
    "wrn28_10_silu": _wide(28, 10, "silu"),  # Gowal et al. 2021, Wang et al. 2023
    "wrn16_4_silu": _wide(16, 4, "silu"),  # a small one, for CPU runs
    "convnext_tiny_cifar": ConvNeXtCifar,
    "vit_tiny_cifar": ViTCifar,
}
_TAKES_IMAGE_SIZE = {"vit_tiny_cifar"}  # its position embedding is sized for the patch grid


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int = 28) -> nn.Module:
    """A fresh model by name (one of :data:`MODELS`) for (B, ``in_channels``, ``image_size``,
    ``image_size``) inputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if name == "small_cnn" and image_size != 28:
        # Its fc1 is sized for the 4x4 feature map that 28x28 inputs leave.
        raise ValueError(
            f"small_cnn takes 28x28 images (MNIST-like), got {image_size}x{image_size}; "
            "use resnet20, resnet18, preact_resnet18 or a WideResNet"
        )
    if name in _TAKES_IMAGE_SIZE:
        return MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    return MODELS[name](in_channels=in_channels, num_classes=num_classes)


__all__ = [
    "MODELS",
    "build_model",
    "SmallCNN",
    "ResNet18",
    "ResNet20",
    "PreActResNet18",
    "WideResNet",
    "ConvNeXtCifar",
    "ViTCifar",
]

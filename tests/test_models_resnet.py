"""The CIFAR-style ResNets and the model factory."""

import pytest
import torch

import lfr_ext
from lfr_ext.models import MODELS, PreActResNet18, ResNet18, ResNet20, build_model


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "preact_resnet18"])
@pytest.mark.parametrize("channels,size", [(1, 12), (3, 16)])  # small images keep the test fast
def test_resnets_map_images_to_logits(name, channels, size):
    model = build_model(name, in_channels=channels, num_classes=7, image_size=size)
    x = torch.rand(2, channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_counts_match_the_literature():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # He et al. (2016): ResNet-20 has 0.27M parameters; CIFAR ResNet-18 about 11.2M.
    assert 0.26e6 < count(ResNet20()) < 0.28e6
    assert 11.1e6 < count(ResNet18()) < 11.2e6
    assert 11.1e6 < count(PreActResNet18()) < 11.2e6


def test_resnet20_downsamples_twice():
    model = ResNet20()
    features = model.blocks(torch.relu(model.stem_bn(model.stem(torch.rand(1, 3, 32, 32)))))
    assert features.shape == (1, 64, 8, 8)


def test_lfr_penalty_through_batchnorm_resnet():
    """LFR's double backprop runs through BatchNorm residual blocks, in train mode."""
    model = build_model("resnet20", in_channels=3, num_classes=10, image_size=16).train()
    x, y = torch.rand(3, 3, 16, 16), torch.randint(0, 10, (3,))
    out = lfr_ext.lfr_loss(model, x, y, lam=0.03, eps=0.031, step_size=0.007, steps=2)
    out.loss.backward()
    assert torch.isfinite(out.penalty) and out.penalty > 0
    assert model.fc.weight.grad is not None


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16", in_channels=3, num_classes=10)
    with pytest.raises(ValueError, match="small_cnn takes 28x28"):
        build_model("small_cnn", in_channels=3, num_classes=10, image_size=32)
    assert set(MODELS) == {
        "small_cnn",
        "resnet18",
        "resnet20",
        "preact_resnet18",
        "wrn34_10",
        "wrn28_10",
        "wrn28_10_silu",
        "wrn16_4_silu",
        "convnext_tiny_cifar",
        "vit_tiny_cifar",
    }
    from lfr_ext.models import WideResNet

    with pytest.raises(ValueError, match="depth 6n \\+ 4"):
        WideResNet(30, 10)
    with pytest.raises(ValueError, match="activation must be one of"):
        WideResNet(16, 4, activation="gelu")


@pytest.mark.parametrize(
    "name, parameters", [("wrn34_10", 46_160_474), ("wrn28_10", 36_479_194), ("wrn16_4_silu", 2_748_890)]
)
def test_wide_resnets_have_the_published_sizes(name, parameters):
    """WRN-34-10 46.2M (TRADES), WRN-28-10 36.5M and WRN-16-4 2.7M (Zagoruyko & Komodakis)."""
    model = build_model(name, in_channels=3, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_silu_wide_resnet_trains_with_lfr_on_the_linearized_engine():
    import warnings

    torch.manual_seed(0)
    model = build_model("wrn16_4_silu", in_channels=3, num_classes=10).train()
    x, y = torch.rand(2, 3, 16, 16), torch.randint(0, 10, (2,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to double backprop would warn
        out = lfr_ext.lfr_loss(model, x, y, lam=0.1, eps=8 / 255, step_size=2 / 255, steps=1)
    out.loss.backward()
    assert torch.isfinite(out.penalty) and model.fc.weight.grad is not None


def test_convnext_and_vit_train_with_lfr_on_the_linearized_engine():
    import warnings

    for name in ("convnext_tiny_cifar", "vit_tiny_cifar"):
        torch.manual_seed(0)
        model = build_model(name, in_channels=3, num_classes=10, image_size=16).train()
        x, y = torch.rand(2, 3, 16, 16), torch.randint(0, 10, (2,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to double backprop would warn
            out = lfr_ext.lfr_loss(model, x, y, lam=0.1, eps=8 / 255, step_size=2 / 255, steps=1, hvp="linearized")
        out.loss.backward()
        assert torch.isfinite(out.penalty) and model.head.weight.grad is not None

"""The linearized engine on models nobody here wrote: timm's ResNet, EfficientNet, ConvNeXt and ViT
(built with ``pretrained=False``: nothing is downloaded), at CIFAR-sized inputs, in fp64.

Each model either matches the authors' double backprop (input gradient ``g``, ``H v``, the
penalty and every parameter gradient, train and eval mode) or is refused by name. Runs where timm
is installed; CI installs it beside its CUDA build of torch (``.ci/run``).
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lfr_ext
from lfr_ext.hvp import grad_and_hvp_linearized
from lfr_ext.reference import default_loss, grad_and_hvp_double_backprop

timm = pytest.importorskip("timm")

# name -> timm.create_model keyword arguments (small inputs; no stochastic depth or dropout).
MODELS = {
    "resnet10t": {},  # ReLU, BatchNorm, max-pool
    "efficientnet_b0": {},  # SiLU, depthwise convs, squeeze-and-excitation (a sigmoid gate: two operands)
    "convnext_atto": {},  # depthwise 7x7, LayerNorm over channels, GELU, layer scale
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},  # LayerNorm, fused attention, GELU MLP
}
CLASSES = 5


def _make(name, train):
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, num_classes=CLASSES, drop_rate=0.0, drop_path_rate=0.0, **MODELS[name]
    )
    model = model.double().train(train)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 3])
    return model, x, y


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_inner_step_matches_double_backprop(name):
    """``g`` and ``H v`` (q=1), after the engine's verification of the recording: no custom
    ``autograd.Function``, and the adjoint test ``w^T J v = (J^T w)^T v`` against autograd."""
    model, x, y = _make(name, train=False)
    q = 1
    with sdpa_kernel(SDPBackend.MATH):
        g_ref, h_ref = grad_and_hvp_double_backprop(model, x, y, default_loss, q)
    g, h = grad_and_hvp_linearized(model, x, y, default_loss, q, verify=True)
    assert _rel_err(g, g_ref) < 1e-12
    assert _rel_err(h, h_ref) < 1e-10


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("train", [False, True])
def test_timm_penalty_and_parameter_gradients_match_double_backprop(name, train):
    model, x, y = _make(name, train=train)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for hvp in ("double_backprop", "linearized"):
        torch.manual_seed(5)
        value = lfr_ext.flatness_penalty(model, x, y, eps=8 / 255, step_size=2 / 255, steps=2, hvp=hvp)
        results[hvp] = (value, torch.autograd.grad(value, params, allow_unused=True))
    (ref, ref_grads), (got, got_grads) = results["double_backprop"], results["linearized"]
    assert _rel_err(got, ref) < 1e-10
    scale = torch.sqrt(sum(b.norm() ** 2 for b in ref_grads if b is not None))
    for a, b in zip(got_grads, ref_grads):
        assert (a is None) == (b is None)
        if b is not None:
            assert (a - b).norm() <= 1e-9 * b.norm() + 64 * torch.finfo(torch.float64).eps * scale

"""The exact linearized tangent pass against double backprop (the authors' way)."""

import logging
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lfr_ext
from lfr_ext.hvp import (
    grad_and_hvp_finite_difference,
    grad_and_hvp_forward,
    grad_and_hvp_linearized,
    penalty_linearized,
)
from lfr_ext.linearized import DeclinedOpError, TangentTape, UnsupportedOpError
from lfr_ext.models import ConvNeXtCifar, SmallCNN, ViTCifar, WideResNet
from lfr_ext.reference import default_loss, grad_and_hvp_double_backprop, penalty_at
from tests.models_for_tests import (
    BNNet,
    ConvNeXtBlockNet,
    GeluLayerNormNet,
    LeakyAvgNet,
    MaskedAttentionWeightsNet,
    SineNet,
    SmoothZooNet,
    TinyResNet,
    WrittenOutAttentionNet,
)
from tests.utils import DEVICES, assert_grads_close, double_vjp_jvp, params_grads, rel_err

MODELS = {
    "small_cnn": (lambda: SmallCNN(zero_init_last=False), (3, 1, 28, 28), 10),  # one shared in-place ReLU
    "resnet_bn": (TinyResNet, (4, 3, 10, 10), 5),
    "leaky_avg_cat": (LeakyAvgNet, (3, 2, 8, 8), 4),
    "bn_residual_avgpool": (BNNet, (4, 1, 8, 8), 3),
    # Not piecewise linear: the linear maps depend on x (smooth activations, normalisations).
    "wrn_silu": (lambda: WideResNet(10, 1, in_channels=3, num_classes=5, activation="silu"), (3, 3, 8, 8), 5),
    "convnext_block": (ConvNeXtBlockNet, (3, 3, 8, 8), 5),
    "smooth_zoo_groupnorm": (SmoothZooNet, (3, 2, 6, 6), 4),
    "gelu_layernorm_mlp": (GeluLayerNormNet, (4, 6), 3),
    "inplace_smooth_mlp": (
        lambda: nn.Sequential(
            nn.Linear(6, 8), nn.SiLU(inplace=True), nn.Linear(8, 8), nn.ELU(inplace=True), nn.Linear(8, 3)
        ),
        (4, 6),
        3,
    ),
    # Attention: softmax and products of two input-dependent tensors.
    "vit_block": (lambda: ViTCifar(num_classes=5, image_size=8, patch=4, dim=12, depth=1, heads=2), (3, 3, 8, 8), 5),
    "convnext_cifar": (lambda: ConvNeXtCifar(num_classes=5, dims=(4, 8), depths=(1, 1)), (3, 3, 8, 8), 5),
    "attention_written_out": (WrittenOutAttentionNet, (3, 24), 3),
    "attention_masks_weights": (MaskedAttentionWeightsNet, (3, 24), 3),
}
COUPLED_IN_TRAIN = ("resnet_bn", "bn_residual_avgpool", "wrn_silu")  # train-mode BatchNorm


def _make(name, dtype=torch.float64, train=False, seed=0, device="cpu"):
    torch.manual_seed(seed)
    factory, shape, classes = MODELS[name]
    model = factory().to(device=device, dtype=dtype).train(train)
    x = torch.rand(shape, dtype=dtype).to(device)
    y = torch.randint(0, classes, (shape[0],)).to(device)
    return model, x, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("train", [False, True])
def test_tangent_pass_is_the_jacobian(name, train, device):
    model, x, _ = _make(name, train=train, device=device)
    v = torch.randn_like(x)
    x = x.requires_grad_(True)
    torch.manual_seed(1)
    with TangentTape(x) as tape:
        logits = model(x)
    got = tape.tangent(v, logits)
    expected = double_vjp_jvp(model, x, v, seed=1)
    assert rel_err(got, expected) < 1e-12
    assert tape.couples_samples == (train and name in COUPLED_IN_TRAIN)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("q", [1, 2, math.inf])
def test_inner_step_gradient_and_hvp(name, q, device):
    model, x, y = _make(name, train=False, device=device)
    with sdpa_kernel(SDPBackend.MATH):  # the oracle differentiates attention twice
        g_ref, h_ref = grad_and_hvp_double_backprop(model, x, y, default_loss, q)
    g, h = grad_and_hvp_linearized(model, x, y, default_loss, q)  # attention on PyTorch's default kernels
    assert rel_err(g, g_ref) < 1e-12
    assert rel_err(h, h_ref) < 1e-10
    assert torch.equal(torch.sign(h), torch.sign(h_ref)) or (torch.sign(h) != torch.sign(h_ref)).float().mean() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("q", [1, 2, math.inf])
@pytest.mark.parametrize("penalty_mode", ["caller", "eval"])
def test_flatness_penalty_linearized_equals_double_backprop_fp64(name, q, penalty_mode, device):
    """The final x', the penalty and its gradient w.r.t. every parameter, train mode (BN
    batch statistics, Dropout with the same mask on both sides) and eval mode; on every device
    (on a GPU, Dropout is the fused native_dropout)."""
    model, x, y = _make(name, train=True, device=device)
    results = {}
    for hvp in ("double_backprop", "linearized"):
        torch.manual_seed(5)  # same start noise and Dropout masks
        value = lfr_ext.flatness_penalty(
            model, x, y, eps=0.1, step_size=0.02, steps=4, q=q, hvp=hvp, penalty_mode=penalty_mode
        )
        results[hvp] = (value, params_grads(model, value))
    (ref, ref_grads), (got, got_grads) = results["double_backprop"], results["linearized"]
    assert rel_err(got, ref) < 1e-10
    assert_grads_close(got_grads, ref_grads, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["small_cnn", "resnet_bn", "wrn_silu", "convnext_block", "vit_block"])
def test_ascended_point_identical(name, device):
    model, x, y = _make(name, train=False, device=device)
    points = {}
    for hvp in ("double_backprop", "linearized"):
        points[hvp], _ = lfr_ext.reference.flatness_ascent_reference(
            model,
            x,
            y,
            eps=0.1,
            step_size=0.02,
            steps=5,
            generator=torch.Generator(device).manual_seed(0),
            grad_and_hvp=lambda *a, h=hvp: lfr_ext.hvp.SecondOrderEngine(h, model, True).grad_and_hvp(*a),
        )
    assert torch.equal(points["linearized"], points["double_backprop"])


@pytest.mark.parametrize("name", ["small_cnn", "resnet_bn"])
def test_flatness_penalty_fp32(name):
    model, x, y = _make(name, dtype=torch.float32, train=True)
    values = {}
    for hvp in ("double_backprop", "linearized"):
        torch.manual_seed(2)
        value = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=3, hvp=hvp)
        values[hvp] = (value, params_grads(model, value))
    assert rel_err(values["linearized"][0], values["double_backprop"][0]) < 1e-4
    assert_grads_close(values["linearized"][1], values["double_backprop"][1], 1e-4)


def test_penalty_gradient_wrt_point():
    """d P / d x' of the linearized penalty is the exact HVP (train-mode BatchNorm included)."""
    model, x, y = _make("resnet_bn", train=True)
    torch.manual_seed(0)
    z = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(penalty_linearized(model, z, y, 1)[0].sum(), z)
    torch.manual_seed(0)
    z = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(penalty_at(model, z, y, q=1).sum(), z)
    assert rel_err(got, expected) < 1e-10


def test_train_batchnorm_outer_gradient_is_exact_for_every_method():
    """Regression guard for PyTorch's train-mode batch_norm forward-AD rule, which gives wrong
    reverse-over-forward weight gradients: no hvp method may route the outer gradient through it."""
    model, x, y = _make("resnet_bn", train=True)
    grads = {}
    for hvp in ("double_backprop", "linearized", "forward", "finite_difference"):
        torch.manual_seed(3)
        value = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=0, hvp=hvp)
        grads[hvp] = params_grads(model, value)
    for hvp in ("linearized", "forward", "finite_difference"):
        assert_grads_close(grads[hvp], grads["double_backprop"], 1e-10)


@pytest.mark.parametrize("name", ["small_cnn", "resnet_bn"])
def test_forward_mode_hvp_exact(name):
    model, x, y = _make(name, train=False)
    g_ref, h_ref = grad_and_hvp_double_backprop(model, x, y, default_loss, 1)
    g, h = grad_and_hvp_forward(model, x, y, default_loss, 1)
    assert rel_err(g, g_ref) < 1e-12 and rel_err(h, h_ref) < 1e-10


def test_finite_difference_is_an_approximation():
    model, x, y = _make("resnet_bn", train=False)
    _, h_ref = grad_and_hvp_double_backprop(model, x, y, default_loss, 1)
    _, h = grad_and_hvp_finite_difference(model, x, y, default_loss, 1)
    agreement = (torch.sign(h) == torch.sign(h_ref)).double().mean().item()
    assert 0.5 < agreement  # close to the truth in most entries, but no exactness promised


def test_relu_kink_convention():
    """Pre-activations exactly 0: relu'(0) = 0, as PyTorch's autograd."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0  # units 0-2 sit exactly at the kink for every input
    x = torch.rand(5, 4, dtype=torch.float64)
    v = torch.randn_like(x)
    with TangentTape(x.requires_grad_(True)) as tape:
        out = model(x)
    assert rel_err(tape.tangent(v, out), double_vjp_jvp(model, x, v, seed=0)) < 1e-14
    g_ref, h_ref = grad_and_hvp_double_backprop(model, x, torch.tensor([0, 1, 2, 0, 1]), default_loss, 1)
    g, h = grad_and_hvp_linearized(model, x, torch.tensor([0, 1, 2, 0, 1]), default_loss, 1)
    assert torch.allclose(h, h_ref, rtol=1e-12, atol=1e-15)


def test_uncovered_model_auto_warns_and_linearized_raises():
    torch.manual_seed(0)
    model = SineNet().double()
    x, y = torch.rand(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with lfr_ext.hvp.CACHE.scoped(), pytest.warns(RuntimeWarning, match=r"falls back to double backprop.*`torch.sin`"):
        auto = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=2, init_std=0.0)
    reference = lfr_ext.flatness_penalty(
        model, x, y, eps=0.1, step_size=0.02, steps=2, init_std=0.0, hvp="double_backprop"
    )
    torch.testing.assert_close(auto, reference, rtol=0, atol=0)
    with pytest.raises(UnsupportedOpError, match=r"does not support `torch.sin`"):
        lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=2, hvp="linearized")


def test_auto_picks_linearized_and_logs(caplog):
    model, x, y = _make("small_cnn", dtype=torch.float32)
    with caplog.at_level(logging.DEBUG, logger="lfr_ext"):
        lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=1)
    assert "hvp='auto' -> linearized" in caplog.text


def test_attention_dropout_is_refused_by_name():
    """Attention dropout draws its mask inside the kernel, where the tape cannot read it."""
    torch.manual_seed(0)
    x = torch.rand(2, 4, 6, dtype=torch.float64, requires_grad=True)
    attention = nn.MultiheadAttention(6, 2, dropout=0.5, batch_first=True).double().train()
    with pytest.raises(UnsupportedOpError, match="multi_head_attention_forward with dropout in training"):
        with TangentTape(x):
            attention(x, x, x, need_weights=False)
    with TangentTape(x) as tape:  # in eval mode its dropout is off: covered
        out = attention.eval()(x, x, x, need_weights=False)[0]
    assert tape.carries(out)
    with pytest.raises(UnsupportedOpError, match="scaled_dot_product_attention with dropout_p > 0"):
        with TangentTape(x):
            q = x.view(2, 4, 2, 3).transpose(1, 2)
            nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)


def test_fully_masked_attention_rows_are_zero_as_in_pytorch():
    """A query row whose keys are all masked is 0 in PyTorch's attention (not NaN): so are its
    tangent and its HVP, through SDPA's boolean mask and a fully padded sample of
    nn.MultiheadAttention."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(6, 2, batch_first=True).double()
    keep = torch.tensor([[True, True, False, True], [False] * 4, [True] * 4, [True, False, False, False]])
    padding = torch.tensor([[False, False, True, False], [True] * 4])

    class Masked(nn.Module):
        def forward(self, x):
            q = x.view(2, 4, 2, 3).transpose(1, 2)
            masked = nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep).transpose(1, 2)
            padded = attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]
            return (masked.reshape(2, 4, 6) + padded).flatten(1)

    model = Masked()
    x = torch.rand(2, 4, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(x)
    with TangentTape(x) as tape:
        out = model(x)
    got = tape.tangent(v, out)
    assert torch.isfinite(got).all()
    assert rel_err(got, double_vjp_jvp(model, x, v, seed=0)) < 1e-12
    head = nn.Linear(24, 3).double()
    net = nn.Sequential(model, head)
    y = torch.tensor([0, 2])
    with sdpa_kernel(SDPBackend.MATH):
        g_ref, h_ref = grad_and_hvp_double_backprop(net, x, y, default_loss, 1)
    g, h = grad_and_hvp_linearized(net, x, y, default_loss, 1, verify=True)
    assert rel_err(g, g_ref) < 1e-12 and rel_err(h, h_ref) < 1e-10


def test_inplace_write_to_a_tensor_a_recorded_map_reads_is_refused():
    """tanh's tangent reads its output: writing that output in place afterwards would change
    the recorded map (autograd refuses the same for its saved tensors)."""
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with TangentTape(z) as tape:
        a = torch.tanh(z * 1.0)
        a.mul_(3)
    with pytest.raises(UnsupportedOpError, match="in-place write, after it was recorded"):
        tape.tangent(torch.ones_like(z), a)
    with TangentTape(z) as tape:  # SiLU's reads its input: writing its output is fine
        b = nn.functional.silu(z * 1.0)
        b.mul_(3)
    expected = 3 * torch.func.jvp(nn.functional.silu, (z.detach(),), (torch.ones_like(z),))[1]
    torch.testing.assert_close(tape.tangent(torch.ones_like(z), b), expected, rtol=1e-12, atol=0)


def test_a_declined_op_class_is_refused_by_name_and_class():
    model, x, _ = _make("vit_block")
    x = x.requires_grad_(True)
    with pytest.raises(DeclinedOpError, match=r"`torch.nn.functional.multi_head_attention_forward` is attention.*slow"):
        with TangentTape(x, declined={"attention": "measured slow"}):
            model(x)
    with TangentTape(x, declined={"batch statistics": "measured slow"}) as tape:  # other classes still record
        logits = model(x)
    assert tape.carries(logits) and tape.source_dependent_classes == {"normalisation", "smooth activation", "attention"}


@pytest.mark.parametrize(
    "name, on_linearized",
    [("convnext_block", True), ("vit_block", "attention" not in lfr_ext.hvp.AUTO_DECLINED_CLASSES)],
)
def test_auto_follows_the_measured_policy(name, on_linearized, caplog, recwarn):
    """auto runs a declined class (lfr_ext.hvp.AUTO_DECLINED_CLASSES) by double backprop, saying so
    in the log, not as a coverage warning; the result is the exact one either way."""
    model, x, y = _make(name, train=True)
    with lfr_ext.hvp.CACHE.scoped(), caplog.at_level(logging.DEBUG, logger="lfr_ext"):
        torch.manual_seed(5)
        auto = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=2)
        engine = lfr_ext.hvp.SecondOrderEngine("auto", model, default_loss=True)
        assert engine.method == ("linearized" if on_linearized else "double_backprop")
    assert ("leaves to double backprop" in caplog.text) != on_linearized
    assert not any("falls back" in str(w.message) for w in recwarn.list)
    torch.manual_seed(5)
    exact = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=2, hvp="double_backprop")
    assert rel_err(auto, exact) < 1e-10


def test_custom_loss_falls_back_and_linearized_refuses():
    model, x, y = _make("small_cnn", dtype=torch.float32)

    def loss(logits, target):
        return nn.functional.cross_entropy(logits, target, reduction="none", label_smoothing=0.1)

    lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=1, loss_fn=loss)
    with pytest.raises(ValueError, match="needs the default cross-entropy"):
        lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=1, loss_fn=loss, hvp="linearized")


def test_per_sample_penalty_with_coupled_batchnorm():
    """reduction='none' with train-mode BatchNorm: auto gives exact per-sample penalties (by
    double backprop), explicit linearized refuses."""
    model, x, y = _make("resnet_bn", train=True)
    model.drop.p = 0.0
    auto = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=2, reduction="none", init_std=0.0)
    ref = lfr_ext.flatness_penalty(
        model, x, y, eps=0.1, step_size=0.02, steps=2, reduction="none", init_std=0.0, hvp="double_backprop"
    )
    for i in range(len(x)):  # each sample's penalty has its own exact gradient
        assert_grads_close(params_grads(model, auto[i]), params_grads(model, ref[i]), 1e-10)
    with pytest.raises(ValueError, match="couples samples"):
        lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=2, reduction="none", hvp="linearized")


def test_inplace_on_view_refused():
    class ViewInplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            t = self.fc(x)
            t.view(-1).relu_()  # changes t through an alias
            return t

    model = ViewInplace().double()
    x = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(UnsupportedOpError, match="in place on a view"):
        with TangentTape(x):
            model(x)


def test_computation_hidden_from_the_tape_is_caught():
    """A branch the tape cannot see would make J v silently wrong; the cross-check against
    autograd catches it: auto falls back (exact result), linearized raises."""

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)
            self.side = nn.Linear(6, 3)

        def forward(self, x):
            with torch._C.DisableTorchFunction():  # this product runs where no mode can see it
                hidden = x * 2.0
            return self.fc(torch.relu(x)) + self.side(hidden)

    torch.manual_seed(0)
    model = Hidden().double()
    x, y = torch.rand(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with lfr_ext.hvp.CACHE.scoped(), pytest.warns(RuntimeWarning, match="did not record"):
        auto = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=2, init_std=0.0)
    exact = lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.02, steps=2, init_std=0.0, hvp="double_backprop")
    torch.testing.assert_close(auto, exact, rtol=0, atol=0)
    with pytest.raises(UnsupportedOpError, match="did not record"):
        lfr_ext.flatness_penalty(Hidden().double(), x, y, eps=0.1, step_size=0.02, steps=2, hvp="linearized")


def test_input_aliases_made_by_a_pre_hook_carry_the_tangent():
    """FSDP2's pre-forward hook passes a module's inputs through an identity autograd.Function:
    views no torch function produced. ``through_input_aliases`` gives them their original's
    tangent; a replacement that is not an alias (other memory) is not taken for one."""

    def alias_hook(module, args):
        with torch._C.DisableTorchFunction():  # as an autograd.Function's output: unseen by the tape
            return tuple(a.view_as(a) for a in args)

    def copy_hook(module, args):
        with torch._C.DisableTorchFunction():
            return tuple(a.clone() for a in args)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(x)
    expected = double_vjp_jvp(model, x, v, seed=0)
    handle = model[2].register_forward_pre_hook(alias_hook)
    with TangentTape(x) as tape, tape.through_input_aliases([model[2]]):
        logits = model(x)
    assert rel_err(tape.tangent(v, logits), expected) < 1e-12
    with TangentTape(x) as tape:  # without it, the alias breaks the chain
        logits = model(x)
    assert not tape.carries(logits)
    handle.remove()
    model[2].register_forward_pre_hook(copy_hook)
    with TangentTape(x) as tape, tape.through_input_aliases([model[2]]):
        logits = model(x)
    assert not tape.carries(logits)
    assert len(model[2]._forward_pre_hooks) == 1  # the tape removed its own hooks

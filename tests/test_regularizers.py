"""Each regulariser of :mod:`lfr_ext.regularizers` against a transcription of its official code
(tests/official_penalties.py) in fp64: the loss, its data term and penalty, every parameter
gradient and the running statistics after, on a ReLU net with BatchNorm in train mode, a
GELU/LayerNorm net (a ConvNeXt block) and a small ViT, with the tangent pass and with double
backprop; and the GAN penalties written with lfr_ext.input_grad against theirs."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import lfr_ext
from lfr_ext import regularizers
from tests import official_penalties as official
from tests.models_for_tests import BNNet, ConvNeXtBlockNet, TinyViT
from tests.utils import assert_grads_close, rel_err

RTOL = 1e-10
EPS = 8 / 255

MODELS = {
    "relu_batchnorm_train": (lambda: BNNet(drop=0.0), (1, 8, 8), 3),
    "gelu_layernorm": (ConvNeXtBlockNet, (3, 8, 8), 5),
    "vit": (TinyViT, (3, 8, 8), 5),
}
HVPS = ["linearized", "double_backprop"]


def _setup(name, batch=6):
    factory, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = factory().double().train()
    x = torch.rand(batch, *shape, dtype=torch.float64) * 0.9 + 0.05  # no pixel exactly at the box
    y = torch.randint(0, classes, (batch,))
    return model, x, y


def _compare(model, ours, theirs):
    """``ours(net)`` and ``theirs(net)`` on copies of ``model``: the (loss, data, penalty) values,
    every parameter gradient of the loss, and the buffers after."""
    results = []
    for build in (ours, theirs):
        net = copy.deepcopy(model)
        with contextlib.nullcontext() if build is ours else sdpa_kernel(SDPBackend.MATH):  # double backward
            out = build(net)
        grads = torch.autograd.grad(out.loss, list(net.parameters()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, net.parameters())]
        results.append((out, grads, [b.clone() for b in net.buffers()]))
    (mine, my_grads, my_buffers), (ref, ref_grads, ref_buffers) = results
    for field in ("loss", "data_loss", "penalty"):
        assert rel_err(getattr(mine, field).detach(), getattr(ref, field).detach()) <= RTOL, field
    assert_grads_close(my_grads, ref_grads, RTOL)
    for a, b in zip(my_buffers, ref_buffers):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_norm(name, hvp):
    model, x, y = _setup(name)
    _compare(
        model,
        lambda net: regularizers.gradient_norm(net, x, y, alpha=0.6, hvp=hvp),
        lambda net: official.gradnorm_official(net, x, y, alpha=0.6),
    )


@pytest.mark.parametrize("norm, variant", [("l2", "l2_double_backprop"), ("l1", "l1_double_backprop")])
@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("name", list(MODELS))
def test_input_gradient_regularization(name, hvp, norm, variant):
    model, x, y = _setup(name)
    _compare(
        model,
        lambda net: regularizers.input_gradient_regularization(net, x, y, lam=30.0, norm=norm, hvp=hvp),
        lambda net: official.igr_official(net, x, y, lam=30.0, variant=variant),
    )


@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("name", list(MODELS))
def test_cure(name, hvp):
    model, x, y = _setup(name)
    _compare(
        model,
        lambda net: regularizers.cure(net, x, y, h=0.05, lam=4.0, hvp=hvp),
        lambda net: official.cure_official(net, x, y, h=0.05, lambda_=4.0),
    )
    net = copy.deepcopy(model)
    regularizers.cure(net, x, y, h=0.05, lam=4.0, hvp=hvp)
    assert all(m.training for m in net.modules())  # the penalty passes' eval mode is undone


@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("name", list(MODELS))
def test_gradalign(name, hvp):
    model, x, y = _setup(name)
    generator = torch.Generator().manual_seed(4)
    eta = torch.empty_like(x).uniform_(-EPS, EPS, generator=generator)
    delta_init = torch.empty_like(x).uniform_(-EPS, EPS, generator=generator)
    for start in (None, delta_init):
        _compare(
            model,
            lambda net: regularizers.gradalign(net, x, y, eps=EPS, lam=0.2, eta=eta, delta_init=start, hvp=hvp),
            lambda net: official.gradalign_official(net, x, y, eps=EPS, lam=0.2, eta=eta, delta_init=start),
        )


@pytest.mark.parametrize("projections", [1, 3])
@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("name", list(MODELS))
def test_jacobian_regularization(name, hvp, projections):
    model, x, y = _setup(name)
    classes = MODELS[name][2]
    v = torch.randn(projections, x.shape[0], classes, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _compare(
        model,
        lambda net: regularizers.jacobian_regularization(net, x, y, lam=0.05, projections=projections, v=v, hvp=hvp),
        lambda net: official.jacobian_reg_official(net, x, y, lambda_jr=0.05, n=projections, v=v),
    )


@pytest.mark.parametrize("hvp", HVPS)
def test_gradalign_on_pixels_at_the_box(hvp):
    """Saturated pixels (exactly 0 or 1, as in uint8 / 255 data): the FGSM step passes the box as
    the official clamp did."""
    model, x, y = _setup("relu_batchnorm_train")
    x = x.clone()
    x[:, :, :3] = 0.0
    x[:, :, -2:] = 1.0
    eta = torch.empty_like(x).uniform_(-EPS, EPS, generator=torch.Generator().manual_seed(4))
    _compare(
        model,
        lambda net: regularizers.gradalign(net, x, y, eps=EPS, lam=0.2, eta=eta, hvp=hvp),
        lambda net: official.gradalign_official(net, x, y, eps=EPS, lam=0.2, eta=eta),
    )


def test_gradalign_draws_eta_from_the_generator():
    model, x, y = _setup("relu_batchnorm_train")
    first = regularizers.gradalign(copy.deepcopy(model), x, y, eps=EPS, generator=torch.Generator().manual_seed(1))
    again = regularizers.gradalign(copy.deepcopy(model), x, y, eps=EPS, generator=torch.Generator().manual_seed(1))
    other = regularizers.gradalign(copy.deepcopy(model), x, y, eps=EPS, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first.penalty, again.penalty) and not torch.equal(first.penalty, other.penalty)


def test_bad_arguments():
    model, x, y = _setup("relu_batchnorm_train")
    with pytest.raises(ValueError, match="norm must be"):
        regularizers.input_gradient_regularization(model, x, y, lam=1.0, norm="l3")
    with pytest.raises(ValueError, match="projections"):
        regularizers.jacobian_regularization(model, x, y, lam=1.0, projections=0)


# --- the GAN penalties, as the README writes them on lfr_ext.input_grad ---------------------------


def score(outputs, _y):
    return outputs.squeeze(-1)


class Critic(torch.nn.Module):
    """conv, LeakyReLU, conv, LeakyReLU, linear: (B, 1, 8, 8) -> (B, 1); no BatchNorm (WGAN-GP)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, stride=2, padding=1),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(4, 8, 3, stride=2, padding=1),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 1),
        )

    def forward(self, x):
        return self.net(x)


def _gan_data():
    torch.manual_seed(0)
    critic = Critic().double()
    real, fake = torch.rand(5, 1, 8, 8, dtype=torch.float64), torch.rand(5, 1, 8, 8, dtype=torch.float64)
    return critic, real, fake, torch.rand(5, 1, dtype=torch.float64)


@pytest.mark.parametrize("hvp", HVPS)
def test_wgan_gp_as_the_readme_writes_it(hvp):
    critic, real, fake, alpha = _gan_data()

    def ours(net):
        x_hat = alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake
        g = lfr_ext.input_grad(net, x_hat, loss_fn=score, hvp=hvp)
        penalty = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
        data = net(fake).mean() - net(real).mean()
        return official.PenaltyLoss(data + 10.0 * penalty, data, penalty)

    _compare(critic, ours, lambda net: official.wgan_gp_official(net, real, fake, alpha=alpha, lam=10.0))


@pytest.mark.parametrize("hvp", HVPS)
def test_r1_as_the_readme_writes_it(hvp):
    critic, real, fake, _ = _gan_data()

    def ours(net):
        g, d_real = lfr_ext.input_grad(net, real, loss_fn=score, hvp=hvp, return_outputs=True)
        penalty = g.square().flatten(1).sum(1).mean()
        data = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
        data = data + F.binary_cross_entropy_with_logits(net(fake), torch.zeros_like(d_real))
        return official.PenaltyLoss(data + 10.0 * penalty, data, penalty)

    _compare(critic, ours, lambda net: official.r1_official(net, real, reg_param=10.0, x_fake=fake))


@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("name", list(MODELS))
def test_llr(name, hvp):
    model, x, y = _setup(name)
    delta_init = torch.empty_like(x).uniform_(-EPS, EPS, generator=torch.Generator().manual_seed(6))
    _compare(
        model,
        lambda net: regularizers.llr(net, x, y, eps=EPS, weight_decay=2e-4, steps=4, delta_init=delta_init, hvp=hvp),
        lambda net: official.llr_official(net, x, y, delta_init=delta_init, eps=EPS, num_steps=4),
    )

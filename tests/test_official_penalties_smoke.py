"""Smoke checks of the official-code transcriptions in tests/official_penalties.py: each runs in fp64 on a
small conv net with BatchNorm and on a small MLP, gives a finite loss whose backward reaches every
parameter, is deterministic, and matches a closed form on a linear softmax model (input gradient of the
per-sample CE = W^T (p - e_y))."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.official_penalties import (
    IGR_VARIANTS,
    _LocalStatsBatchNorm,
    cure_official,
    gradalign_official,
    gradnorm_alpha,
    gradnorm_official,
    igr_official,
    jacobian_reg_official,
    llr_epsilon,
    llr_official,
    r1_official,
    wgan_gp_official,
)

B, C_IN, H, K = 6, 2, 4, 5
EPS = 8.0 / 255.0


class ConvBN(nn.Module):
    def __init__(self, out=K):
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * H * H, out)

    def forward(self, x):
        return self.head(F.softplus(self.bn(self.conv(x))).flatten(1))


def mlp(out=K):
    return nn.Sequential(nn.Flatten(), nn.Linear(C_IN * H * H, 7), nn.Tanh(), nn.Linear(7, out))


def linear(out=K):
    return nn.Sequential(nn.Flatten(), nn.Linear(C_IN * H * H, out))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C_IN, H, H, generator=g, dtype=torch.float64) * 0.8 + 0.1
    y = torch.randint(0, K, (B,), generator=g)
    eta = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * EPS
    v = torch.randn(2, B, K, generator=g, dtype=torch.float64)
    return x, y, eta, v


def make(kind, out=K):
    torch.manual_seed(1)
    model = {"conv_bn": ConvBN, "mlp": mlp, "linear": linear}[kind](out).double()
    return model


def run_all(model, x, y, eta, v):
    """name -> (mode the official code uses, callable returning the total loss)."""
    return {
        "gradnorm": ("eval", lambda: gradnorm_official(model, x, y, alpha=0.5)),
        "igr_l2": ("train", lambda: igr_official(model, x, y, lam=100.0)),
        "igr_l1_cs": ("train", lambda: igr_official(model, x, y, lam=1.0, variant="l1_certainty_sensitivity")),
        "cure": ("train", lambda: cure_official(model, x, y, h=0.5, lambda_=4.0)),
        "gradalign": ("train", lambda: gradalign_official(model, x, y, eps=EPS, lam=0.2, eta=eta)),
        "llr": ("train", lambda: llr_official(model, x, y, delta_init=eta, eps=EPS, num_steps=3)),
        "jacobian": ("train", lambda: jacobian_reg_official(model, x, y, lambda_jr=0.01, n=2, v=v)),
        "jacobian_exact": ("train", lambda: jacobian_reg_official(model, x, y, lambda_jr=0.01, n=-1)),
    }


@pytest.mark.parametrize("kind", ["conv_bn", "mlp"])
def test_every_oracle_runs_and_backpropagates(kind):
    x, y, eta, v = data()
    for name in run_all(make(kind), x, y, eta, v):
        model = make(kind)
        mode, fn = run_all(model, x, y, eta, v)[name]
        model.train(mode == "train")
        out = fn()
        assert out.loss.dtype == torch.float64 and out.loss.dim() == 0, name
        assert torch.isfinite(out.loss) and torch.isfinite(out.penalty) and torch.isfinite(out.data_loss), name
        assert out.penalty.item() > 0, name
        out.loss.backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)
        assert any(p.grad.abs().sum() > 0 for p in model.parameters()), name
        # deterministic: the same state and inputs give the same numbers
        again = make(kind)
        again.train(mode == "train")
        assert torch.equal(run_all(again, x, y, eta, v)[name][1]().loss, out.loss.detach()), name


@pytest.mark.parametrize("kind", ["conv_bn", "mlp"])
def test_gan_penalties_run_and_backpropagate(kind):
    x, _, eta, _ = data()
    fake = x.flip(0) * 0.5
    alpha = torch.rand(B, 1, dtype=torch.float64)
    for fn in (
        lambda d: wgan_gp_official(d, x, fake, alpha=alpha),
        lambda d: r1_official(lambda t: d(t).squeeze(1), x, x_fake=fake),
    ):
        d = make(kind, out=1)
        out = fn(d)
        assert torch.isfinite(out.loss) and out.penalty.item() > 0
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


# ----------------------------------------------------------------------------- closed forms, linear model


def linear_parts(model, x, y):
    w, b = model[1].weight, model[1].bias
    p = torch.softmax(x.flatten(1) @ w.T + b, dim=1)
    per_sample_grad = (p - F.one_hot(y, K).double()) @ w  # grad_x l_b, flattened
    return w, b, p, per_sample_grad


def test_gradnorm_and_igr_closed_forms():
    x, y, _, _ = data()
    model = make("linear").eval()
    w, _, p, g = linear_parts(model, x, y)
    out = gradnorm_official(model, x, y, alpha=0.5)
    expected = (4 / 255 / 0.225) * g.abs().sum(1).mean()
    torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, 0.8 * out.data_loss + 1.2 * 0.5 * expected, rtol=1e-12, atol=0)

    model.train()
    forms = {
        "l2_double_backprop": (g**2).sum() / (2 * B**2),
        "l1_double_backprop": g.abs().sum(1).mean(),
        "l2_certainty_sensitivity": (((p - 1 / K) @ w) ** 2).sum() / (2 * B**2),
        "l1_certainty_sensitivity": ((p - 1 / K) @ w).abs().mean() / B,
    }
    assert set(forms) == set(IGR_VARIANTS)
    for variant, expected in forms.items():
        out = igr_official(model, x, y, lam=3.0, variant=variant)
        torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y) + 3.0 * expected, rtol=1e-12, atol=0)


def test_cure_closed_form_and_mode_restored():
    x, y, _, _ = data()
    model = make("linear").eval()
    w, b, p, g = linear_parts(model, x, y)
    h = 0.7
    z = torch.sign(g)
    z = h * (z + 1e-7) / (z.norm(dim=1, keepdim=True) + 1e-7)
    p_z = torch.softmax((x.flatten(1) + z) @ w.T + b, dim=1)
    diff = (p_z - p) @ w
    out = cure_official(model, x, y, h=h, lambda_=4.0)
    torch.testing.assert_close(out.penalty, diff.norm(dim=1).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss, out.data_loss + 4.0 * out.penalty, rtol=1e-12, atol=0)
    assert not model.training
    model.train()
    cure_official(model, x, y, h=h)
    assert model.training


def test_gradalign_closed_form():
    x, y, eta, _ = data()
    model = make("linear").train()
    w, b, _, g1 = linear_parts(model, x, y)
    _, _, _, g2 = linear_parts(model, x + eta, y)
    cos = F.cosine_similarity(g1, g2, dim=1)
    out = gradalign_official(model, x, y, eps=EPS, lam=0.2, eta=eta)
    torch.testing.assert_close(out.penalty, 1 - cos.mean(), rtol=1e-10, atol=1e-14)
    x_adv = (x + (EPS * torch.sign(g1)).view_as(x)).clamp(0, 1)
    torch.testing.assert_close(out.data_loss, F.cross_entropy(model(x_adv), y), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, out.data_loss + 0.2 * out.penalty, rtol=1e-12, atol=0)
    no_reg = gradalign_official(model, x, y, eps=EPS, lam=0.0, eta=eta)
    assert no_reg.penalty.item() == 0 and torch.equal(no_reg.loss, out.data_loss)


def test_llr_closed_form_and_projection():
    x, y, eta, _ = data()
    model = make("linear").train()
    _, _, _, g = linear_parts(model, x, y)
    sf = 0.3
    for steps in (0, 4):
        out = llr_official(model, x, y, delta_init=3 * eta, eps=EPS, num_steps=steps, smoothing_factor=sf)
        d = out.adv_x - x
        assert d.abs().max() <= EPS + 1e-15 and out.adv_x.min() >= 0 and out.adv_x.max() <= 1
        if steps == 0:
            torch.testing.assert_close(out.adv_x, (x + (3 * eta).clamp(-EPS, EPS)).clamp(0, 1), rtol=0, atol=0)
        loss_x = F.cross_entropy(model(x), y, reduction="none")
        loss_adv = F.cross_entropy(model(out.adv_x), y, reduction="none")
        dg = (d.flatten(1) * g).sum(1)
        expected = ((loss_adv - loss_x - dg).abs() + sf * dg.abs()).mean()
        torch.testing.assert_close(out.penalty, expected, rtol=1e-10, atol=1e-15)
        l2 = 0.0002 * (model[1].weight ** 2).sum() / 2
        torch.testing.assert_close(out.loss, 2 * loss_x.mean() + l2 + 4.0 * expected, rtol=1e-10, atol=0)


def test_llr_batchnorm_uses_clean_stats_and_only_the_nominal_forward_updates():
    x, y, eta, _ = data()
    model = make("conv_bn").train()
    reference = copy.deepcopy(model)
    reference(x)  # one train-mode forward: the only running-stat update LLR should make
    llr_official(model, x, y, delta_init=eta, eps=EPS, num_steps=2)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var, rtol=0, atol=0)
    assert "forward" not in model.bn.__dict__
    assert model.bn.num_batches_tracked.item() == 1


def test_jacobian_closed_forms():
    x, y, _, v = data()
    model = make("linear").train()
    w = model[1].weight
    exact = jacobian_reg_official(model, x, y, lambda_jr=0.01, n=-1)
    torch.testing.assert_close(exact.penalty, (w**2).sum() / 2, rtol=1e-12, atol=0)
    vhat = v / v.norm(dim=2, keepdim=True)
    expected = 0.5 * K * ((vhat @ w) ** 2).sum() / (2 * B)
    projected = jacobian_reg_official(model, x, y, lambda_jr=0.01, n=2, v=v)
    torch.testing.assert_close(projected.penalty, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(projected.loss, projected.data_loss + 0.01 * expected, rtol=1e-12, atol=0)


def test_gan_penalties_closed_forms():
    x, _, _, _ = data()
    fake = torch.rand_like(x)
    critic = make("linear", out=1)
    w = critic[1].weight
    alpha = torch.rand(B, dtype=torch.float64)
    gp = wgan_gp_official(critic, x, fake, alpha=alpha, lam=10.0)
    torch.testing.assert_close(gp.penalty, (w.norm() - 1) ** 2, rtol=1e-12, atol=1e-15)
    gap = critic(fake).mean() - critic(x).mean()
    torch.testing.assert_close(gp.loss, gap + 10.0 * gp.penalty, rtol=1e-12, atol=1e-15)
    r1 = r1_official(lambda t: critic(t).squeeze(1), x, reg_param=10.0)
    torch.testing.assert_close(r1.penalty, (w**2).sum(), rtol=1e-12, atol=0)


def test_schedules():
    assert gradnorm_alpha(0, 0, 100) == 0.0
    assert math.isclose(gradnorm_alpha(2, 50, 100), 0.5)
    assert gradnorm_alpha(7, 0, 100) == 1.0
    assert llr_epsilon(0) == 0.0 and math.isclose(llr_epsilon(250), 4 / 255) and llr_epsilon(10**6) == 8 / 255


def test_llr_batchnorm_patch_get_then_set():
    x, _, eta, _ = data()
    model = make("conv_bn").train()
    reference = copy.deepcopy(model)
    with _LocalStatsBatchNorm(model) as bn:
        bn.mode = "get"
        clean = model(x)
        bn.mode = "set"
        shifted = model(x + eta)
    torch.testing.assert_close(clean, reference(x), rtol=1e-12, atol=1e-12)  # batch statistics, as train-mode BN
    pre = reference.conv(x)
    mean, var = pre.mean((0, 2, 3)), pre.var((0, 2, 3), unbiased=False)
    act = reference.conv(x + eta)
    normed = (act - mean[:, None, None]) / torch.sqrt(var[:, None, None] + reference.bn.eps)
    normed = normed * reference.bn.weight[:, None, None] + reference.bn.bias[:, None, None]
    expected = reference.head(F.softplus(normed).flatten(1))  # the perturbed input, the CLEAN batch's stats
    torch.testing.assert_close(shifted, expected, rtol=1e-12, atol=1e-12)
    assert "forward" not in model.bn.__dict__
    assert model.bn.num_batches_tracked.item() == 0

"""Behaviour of the public API: batch independence, determinism, empty batches, options."""

import pytest
import torch
from torch import nn

import lfr_ext
from lfr_ext.models import SmallCNN
from tests.models_for_tests import BNNet, SmoothNet

KW = dict(eps=0.1, step_size=0.02, steps=4)


@pytest.mark.parametrize("q", [1, 2, "inf"])
def test_batch_size_independence(q):
    """In eval mode a sample's penalty is the same alone or in a batch (sum-reduced gradients)."""
    model = SmallCNN(zero_init_last=False).double().eval()
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    batched = lfr_ext.flatness_penalty(model, x, y, q=q, init_std=0.0, reduction="none", **KW)
    alone = torch.cat(
        [
            lfr_ext.flatness_penalty(model, x[i : i + 1], y[i : i + 1], q=q, init_std=0.0, reduction="none", **KW)
            for i in range(5)
        ]
    )
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-12)


def test_determinism_with_generator():
    model = SmallCNN(zero_init_last=False).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    first = lfr_ext.flatness_penalty(model, x, y, generator=torch.Generator().manual_seed(3), **KW)
    second = lfr_ext.flatness_penalty(model, x, y, generator=torch.Generator().manual_seed(3), **KW)
    other = lfr_ext.flatness_penalty(
        model, x, y, generator=torch.Generator().manual_seed(4), init_std=0.05, **{k: v for k, v in KW.items()}
    )
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_gives_zero_that_backprops(reduction):
    model = BNNet().train()
    x, y = torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    p = lfr_ext.flatness_penalty(model, x, y, reduction=reduction, **KW)
    assert p.shape == ((0,) if reduction == "none" else ())
    assert p.requires_grad
    p.sum().backward()
    assert all(torch.count_nonzero(prm.grad) == 0 for prm in model.parameters())
    out = lfr_ext.lfr_loss(model, x, y, lam=0.1, **KW)
    out.loss.backward()
    assert lfr_ext.local_flatness(model, x, y, **KW).shape == (0,)


def test_reductions_agree():
    model = SmallCNN(zero_init_last=False).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    kw = dict(init_std=0.0, **KW)
    per_sample = lfr_ext.flatness_penalty(model, x, y, reduction="none", **kw)
    torch.testing.assert_close(lfr_ext.flatness_penalty(model, x, y, **kw), per_sample.mean())
    torch.testing.assert_close(lfr_ext.flatness_penalty(model, x, y, reduction="sum", **kw), per_sample.sum())


def test_ascent_increases_gradient_norm():
    """The ascent does its job on a smooth model: small sign steps raise sum_i ||g_i||_1."""
    model = SmoothNet().double().eval()
    x, y = 0.2 + 0.6 * torch.rand(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    kw = dict(eps=0.05, step_size=1e-3, init_std=0.0)
    values = [lfr_ext.flatness_penalty(model, x, y, steps=k, **kw).item() for k in range(0, 6)]
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_iterates_stay_in_ball_and_box():
    model = SmallCNN(zero_init_last=False).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    x_adv, norms = lfr_ext.reference.flatness_ascent_reference(model, x, y, eps=0.05, step_size=0.03, steps=5)
    assert norms.shape == (5, 4)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-7
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_penalty_mode_eval_matches_eval_model():
    model = BNNet().train()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    got = lfr_ext.flatness_penalty(model, x, y, penalty_mode="eval", generator=gen(), **KW)
    model.eval()
    expected = lfr_ext.flatness_penalty(model, x, y, generator=gen(), **KW)
    torch.testing.assert_close(got, expected)
    model.train()
    caller = lfr_ext.flatness_penalty(model, x, y, generator=gen(), **KW)
    assert not torch.allclose(caller, got)  # train-mode BatchNorm / Dropout change the penalty


def test_local_flatness_is_max_over_path():
    model = SmallCNN(zero_init_last=False)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    lf = lfr_ext.local_flatness(model, x, y, init_std=0.0, **KW)
    assert lf.shape == (4,) and not lf.requires_grad
    model.eval()
    at_end = lfr_ext.flatness_penalty(model, x, y, init_std=0.0, reduction="none", **KW).detach()
    assert torch.all(lf >= at_end)


def test_any_input_shape_and_custom_loss():
    model = SmoothNet()
    x, y = torch.rand(5, 6), torch.randint(0, 3, (5,))

    def smooth_ce(logits, target):
        return nn.functional.cross_entropy(logits, target, reduction="none", label_smoothing=0.1)

    for q in (1, 2, "inf"):
        p = lfr_ext.flatness_penalty(model, x, y, q=q, loss_fn=smooth_ce, **KW)
        assert p.shape == () and p > 0
    conv = nn.Sequential(nn.Conv3d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x5 = torch.rand(3, 2, 4, 5, 3)
    conv(x5)  # materialise the lazy layer
    assert lfr_ext.flatness_penalty(conv, x5, torch.randint(0, 4, (3,)), **KW).isfinite()

"""gradcheck / gradgradcheck (fp64) of the penalty w.r.t. inputs and parameters."""

import pytest
import torch
from torch.func import functional_call

import lfr_ext
from lfr_ext.reference import penalty_at
from tests.models_for_tests import ReLUNet, SmoothNet

KW = dict(eps=0.05, step_size=0.01, steps=3, init_std=1e-3)


def _setup(q, hvp="double_backprop"):
    # Double backprop on a smooth model; the linearized pass on a ReLU + train-mode BatchNorm one.
    model = (SmoothNet() if hvp == "double_backprop" else ReLUNet().train()).double()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    x = (0.3 + 0.4 * torch.rand(4, 6, dtype=torch.float64)).requires_grad_(True)
    y = torch.tensor([0, 2, 1, 2])

    def penalty(x_, *ps):
        # A fresh generator per call: the start noise is part of the function, not of the check.
        gen = torch.Generator().manual_seed(11)
        return lfr_ext.flatness_penalty(lambda_model(model, names, ps), x_, y, q=q, generator=gen, hvp=hvp, **KW)

    return penalty, (x, *params)


class _Functional(torch.nn.Module):
    """Runs `model` with the given parameter tensors (so gradcheck can perturb them)."""

    def __init__(self, model, names, params):
        super().__init__()
        self.model, self.names, self.params = model, names, params

    def forward(self, x):
        return functional_call(self.model, dict(zip(self.names, self.params)), (x,))


def lambda_model(model, names, params):
    return _Functional(model, names, params)


@pytest.mark.parametrize("hvp", ["double_backprop", "linearized"])
@pytest.mark.parametrize("q", [1, 2, "inf"])
def test_gradcheck_penalty(q, hvp):
    penalty, inputs = _setup(q, hvp)
    assert torch.autograd.gradcheck(penalty, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("q, hvp", [(1, "double_backprop"), (2, "double_backprop"), (1, "linearized")])
def test_gradgradcheck_penalty(q, hvp):
    # The linearized penalty's second derivatives are exact where d||g||_q/dg is locally
    # constant (q = 1, inf); for q = 2 only first derivatives are (documented in lfr_ext.hvp).
    penalty, inputs = _setup(q, hvp)
    assert torch.autograd.gradgradcheck(penalty, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_gradcheck_penalty_at_point():
    """Step 3 alone, w.r.t. the point x' and the parameters."""
    model = SmoothNet().double()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    x_adv = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 2])

    def f(x_, *ps):
        return penalty_at(_Functional(model, names, ps), x_, y, q=2).sum()

    assert torch.autograd.gradcheck(f, (x_adv, *params))
    assert torch.autograd.gradgradcheck(f, (x_adv, *params))


def test_penalty_gradient_wrt_x_is_zero_without_requires_grad():
    """x without requires_grad: the ascent is a constant of the graph, as in the authors' code."""
    model = SmoothNet().double()
    x = torch.rand(4, 6, dtype=torch.float64)
    p = lfr_ext.flatness_penalty(model, x, torch.tensor([0, 1, 2, 0]), hvp="double_backprop", **KW)
    assert p.grad_fn is not None and x.grad is None

"""Mixed precision: bf16 autocast (CPU and CUDA), fp16 autocast with a GradScaler (CUDA).

The rule (flash-attention's, applied to LFR): in low precision the linearized engine's inner
HVP agrees in sign with an fp64 HVP, and its penalty's parameter gradient is as close to the
fp64 one, no worse than the authors' double backprop at the same precision. The GradScaler
recipe (scaled input gradients, unscaled out of place) changes nothing but underflow: with a
power-of-two scale it is bit-exact in fp32. An overflow inside the ascent reaches GradScaler."""

import copy
import math

import pytest
import torch

import lfr_ext
from lfr_ext.hvp import SecondOrderEngine, grad_and_hvp_linearized, penalty_linearized
from lfr_ext.models import SmallCNN
from lfr_ext.reference import default_loss, grad_and_hvp_double_backprop, penalty_at
from tests.models_for_tests import TinyResNet
from tests.utils import requires_cuda

MODELS = {
    "small_cnn": (lambda: SmallCNN(drop=0.0, zero_init_last=False), (32, 1, 28, 28), 10),
    "resnet_bn": (lambda: TinyResNet(drop=0.0), (32, 3, 10, 10), 5),
}
KW = dict(eps=0.1, step_size=0.02, steps=3)


def _problem(name, device="cpu"):
    factory, shape, classes = MODELS[name]
    torch.manual_seed(0)
    return factory().to(device), torch.rand(shape, device=device), torch.randint(0, classes, (shape[0],), device=device)


def _relative(got, exact):
    flat = torch.cat([(a.double() - b).flatten() for a, b in zip(got, exact)])
    return (flat.norm() / torch.cat([b.flatten() for b in exact]).norm()).item()


def _low_precision_rule(name, device, dtype):
    model, x, y = _problem(name, device)
    exact_model = copy.deepcopy(model).double()
    model.eval(), exact_model.eval()
    _, h_exact = grad_and_hvp_double_backprop(exact_model, x.double(), y, default_loss, 1)
    with torch.autocast(device, dtype=dtype):
        _, h_linearized = grad_and_hvp_linearized(model, x, y, default_loss, 1)
        _, h_double_backprop = grad_and_hvp_double_backprop(model, x, y, default_loss, 1)
    sign = torch.sign(h_exact)
    agree_linearized = (torch.sign(h_linearized.double()) == sign).double().mean().item()
    agree_double_backprop = (torch.sign(h_double_backprop.double()) == sign).double().mean().item()
    assert agree_linearized >= agree_double_backprop - 0.005, (agree_linearized, agree_double_backprop)

    model.train(), exact_model.train()  # the penalty pass: train-mode BatchNorm included
    exact = torch.autograd.grad(penalty_at(exact_model, x.double(), y, q=1).mean(), list(exact_model.parameters()))
    with torch.autocast(device, dtype=dtype):
        linearized = penalty_linearized(model, x, y, 1)[0].mean()
        double_backprop = penalty_at(model, x, y, q=1).mean()
    error_linearized = _relative(torch.autograd.grad(linearized, list(model.parameters())), exact)
    error_double_backprop = _relative(torch.autograd.grad(double_backprop, list(model.parameters())), exact)
    assert error_linearized <= 2 * error_double_backprop, (error_linearized, error_double_backprop)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_no_worse_than_double_backprop_cpu(name):
    _low_precision_rule(name, "cpu", torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_autocast_no_worse_than_double_backprop_cuda(name, dtype):
    _low_precision_rule(name, "cuda", dtype)


@pytest.mark.parametrize("hvp", ["linearized", "double_backprop"])
def test_grad_scaler_recipe_is_exact_with_a_power_of_two_scale(hvp):
    """fp32, a scale of 2^12 (2^12 / 32 on the batch-summed input losses): scaling and unscaling
    by powers of two are exact, so the ascended point, the penalty and the unscaled parameter
    gradients equal the unscaled computation bit for bit."""
    first, x, y = _problem("resnet_bn")
    first.train()
    second = copy.deepcopy(first)  # lfr_loss's clean forward updates the BatchNorm statistics
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    results = []
    for model, grad_scaler in ((first, None), (second, scaler)):
        torch.manual_seed(7)
        out = lfr_ext.lfr_loss(model, x, y, lam=0.1, hvp=hvp, grad_scaler=grad_scaler, **KW)
        loss = out.loss if grad_scaler is None else grad_scaler.scale(out.loss)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        if grad_scaler is not None:
            grads = [g / 2.0**12 for g in grads]
        results.append((out.penalty.detach(), grads))
    (penalty, grads), (scaled_penalty, scaled_grads) = results
    assert torch.equal(penalty, scaled_penalty)
    assert all(torch.equal(a, b) for a, b in zip(grads, scaled_grads))


def test_an_overflow_inside_the_ascent_makes_grad_scaler_skip_the_step(monkeypatch):
    """GradScaler sees only parameter gradients: an inf HVP in the ascent must still reach it."""
    model, x, y = _problem("small_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    original = SecondOrderEngine.grad_and_hvp

    def overflowing(self, *args):
        g, h = original(self, *args)
        return g, torch.full_like(h, math.inf)

    monkeypatch.setattr(SecondOrderEngine, "grad_and_hvp", overflowing)
    weights = [p.detach().clone() for p in model.parameters()]
    out = lfr_ext.lfr_loss(model, x, y, lam=0.1, grad_scaler=scaler, **KW)
    assert torch.isfinite(out.loss)  # the value stays as computed: the epoch's running loss is not NaN
    scaler.scale(out.loss).backward()
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))  # step skipped
    assert scaler.get_scale() == 2.0**9  # and the scale lowered
    monkeypatch.undo()
    optimizer.zero_grad()
    scaler.scale(lfr_ext.lfr_loss(model, x, y, lam=0.1, grad_scaler=scaler, **KW).loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_grad_scaler_argument_checked():
    model, x, y = _problem("small_cnn")
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        lfr_ext.flatness_penalty(model, x, y, grad_scaler=2.0, **KW)
    with pytest.raises(ValueError, match="CapturedStep cannot take a grad_scaler"):
        lfr_ext.CapturedStep(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            x,
            y,
            lam=0.1,
            grad_scaler=torch.amp.GradScaler("cpu"),
            **KW,
        )

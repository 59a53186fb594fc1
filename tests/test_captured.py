"""CapturedStep: the whole LFR step as one CUDA graph, with an eager fallback."""

import copy

import pytest
import torch

import lfr_ext
from lfr_ext.models import SmallCNN

from conftest import requires_cuda

KW = dict(lam=0.02, eps=0.1, step_size=0.02, steps=3)


def _setup(device="cpu", drop=0.0):
    torch.manual_seed(0)
    model = SmallCNN(drop=drop, zero_init_last=False).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.rand(8, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    return model, optimizer, x, y


def _manual_steps(model, optimizer, batches, **kw):
    outs = []
    for x, y in batches:
        out = lfr_ext.lfr_loss(model, x, y, **kw)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        outs.append(out.loss.detach())
    return outs


def test_cpu_falls_back_to_the_eager_step():
    model, optimizer, x, y = _setup()
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need CUDA tensors"):
        step = lfr_ext.CapturedStep(model, optimizer, x, y, init_std=0.0, **KW)
    assert not step.captured and "CUDA" in step.reason
    batches = [(torch.rand_like(x), torch.randint(0, 10, (8,))) for _ in range(3)]
    got = [step(bx, by).loss for bx, by in batches]
    expected = _manual_steps(twin, twin_opt, batches, init_std=0.0, **KW)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-6, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_arguments_checked_at_construction():
    model, optimizer, x, y = _setup()
    with pytest.raises(ValueError, match="eps must be >= 0"):
        lfr_ext.CapturedStep(model, optimizer, x, y, **{**KW, "eps": -1.0})
    with pytest.raises(ValueError, match="x must lie inside clip"):
        lfr_ext.CapturedStep(model, optimizer, x + 2, y, **KW)
    with pytest.raises(ValueError, match="generator= is not supported"):
        lfr_ext.CapturedStep(model, optimizer, x, y, generator=torch.Generator(), **KW)
    with pytest.raises(ValueError, match="lam must be"):
        lfr_ext.CapturedStep(model, optimizer, x, y, **{**KW, "lam": -1})


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------
@requires_cuda
def test_capture_leaves_model_and_optimizer_as_before():
    model, optimizer, x, y = _setup("cuda")
    before = copy.deepcopy(model.state_dict())
    step = lfr_ext.CapturedStep(model, optimizer, x, y, **KW)
    assert step.captured, step.reason
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@requires_cuda
def test_replay_matches_eager_steps():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model, optimizer, x, y = _setup("cuda")
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    step = lfr_ext.CapturedStep(model, optimizer, x, y, init_std=0.0, **KW)
    assert step.captured, step.reason
    batches = [(torch.rand_like(x), torch.randint(0, 10, (8,), device="cuda")) for _ in range(3)]
    got = [step(bx, by).loss.clone() for bx, by in batches]
    expected = _manual_steps(twin, twin_opt, batches, init_std=0.0, **KW)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-4, atol=1e-6)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@requires_cuda
def test_other_shape_runs_eagerly_and_lr_change_recaptures():
    model, optimizer, x, y = _setup("cuda")
    step = lfr_ext.CapturedStep(model, optimizer, x, y, **KW)
    with pytest.warns(RuntimeWarning, match="differs from the captured"):
        step(x[:4], y[:4])
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    params = [p.detach().clone() for p in model.parameters()]
    for group in optimizer.param_groups:
        group["momentum"] = 0.0  # with lr 0 and no momentum, a step must leave the weights alone
    step(x, y)
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)


@requires_cuda
def test_non_capturable_optimizer_falls_back():
    model, _, x, y = _setup("cuda")
    optimizer = torch.optim.Adam(model.parameters(), capturable=False)
    with pytest.warns(RuntimeWarning, match="capturable=True"):
        step = lfr_ext.CapturedStep(model, optimizer, x, y, **KW)
    assert not step.captured
    step(x, y)

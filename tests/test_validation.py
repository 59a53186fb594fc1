"""Every bad input raises a clear error naming the argument, before any work is done."""

import math

import pytest
import torch
from torch import nn

import lfr_ext
from lfr_ext.models import SmallCNN

KW = dict(eps=0.1, step_size=0.01, steps=2)


class _CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = SmallCNN(zero_init_last=False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.fixture
def data():
    return _CountingModel(), torch.rand(3, 1, 28, 28), torch.randint(0, 10, (3,))


BAD = [
    ("x", lambda x, y: (x.long(), y), {}, TypeError, "floating-point"),
    ("x", lambda x, y: (x * 0 - 0.5, y), {}, ValueError, "inside clip"),
    ("x", lambda x, y: (x + 1.0, y), {}, ValueError, "inside clip"),
    ("x", lambda x, y: (torch.where(x > 0.5, float("nan"), x), y), {}, ValueError, "NaN or inf"),
    ("x", lambda x, y: (torch.where(x > 0.5, float("inf"), x), y), {}, ValueError, "NaN or inf"),
    ("x", lambda x, y: (x[0, 0, 0, 0], y), {}, ValueError, "batch dimension"),
    ("y", lambda x, y: (x, y[:2]), {}, ValueError, "one entry per sample"),
    ("y", lambda x, y: (x, y.float()), {}, TypeError, "integer tensor"),
    ("y", lambda x, y: (x, y[:, None]), {}, ValueError, "class indices"),
    ("eps", None, {"eps": -0.1}, ValueError, "eps must be >= 0"),
    ("eps", None, {"eps": math.nan}, ValueError, "eps must be a finite"),
    ("steps", None, {"steps": -1}, ValueError, "steps must be an integer"),
    ("steps", None, {"steps": 2.5}, ValueError, "steps must be an integer"),
    ("step_size", None, {"step_size": 0.0}, ValueError, "step_size must be > 0"),
    ("step_size", None, {"step_size": -0.01}, ValueError, "step_size must be > 0"),
    ("q", None, {"q": 3}, ValueError, "q must be 1, 2 or inf"),
    ("q", None, {"q": "l2"}, ValueError, "q must be 1, 2 or inf"),
    ("q", None, {"q": 0}, ValueError, "q must be 1, 2 or inf"),
    ("clip", None, {"clip": (1.0, 0.0)}, ValueError, "lo <= hi"),
    ("init_std", None, {"init_std": -1.0}, ValueError, "init_std must be >= 0"),
    ("reduction", None, {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ("penalty_mode", None, {"penalty_mode": "train"}, ValueError, "penalty_mode must be one of"),
    ("hvp", None, {"hvp": "magic"}, ValueError, "hvp must be one of"),
    ("impl", None, {"impl": "fast"}, ValueError, "impl must be one of"),
    ("loss_fn", None, {"loss_fn": "ce"}, TypeError, "loss_fn must be callable"),
]


@pytest.mark.parametrize(
    "arg, transform, override, error, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_raises_before_any_work(data, arg, transform, override, error, message):
    model, x, y = data
    if transform is not None:
        x, y = transform(x, y)
    with pytest.raises(error, match=message):
        lfr_ext.flatness_penalty(model, x, y, **{**KW, **override})
    assert model.calls == 0


def test_model_and_x_on_different_dtypes(data):
    model, x, y = data
    with pytest.raises(TypeError, match="model's parameters are torch.float32 but x is torch.float64"):
        lfr_ext.flatness_penalty(model, x.double(), y, **KW)
    assert model.calls == 0


def test_model_and_x_on_different_devices(data):
    model, x, y = data
    with pytest.raises(ValueError, match="model is on meta but x is on cpu"):
        lfr_ext.flatness_penalty(model.to("meta"), x, y, **KW)


def test_not_a_module(data):
    _, x, y = data
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lfr_ext.flatness_penalty(lambda t: t, x, y, **KW)


def test_per_sample_loss_required(data):
    model, x, y = data
    with pytest.raises(ValueError, match="one loss per sample"):
        lfr_ext.flatness_penalty(model, x, y, loss_fn=nn.CrossEntropyLoss(), **KW)


def test_lam_checked(data):
    model, x, y = data
    with pytest.raises(ValueError, match="lam must be"):
        lfr_ext.lfr_loss(model, x, y, lam=-1.0, **KW)
    assert model.calls == 0


def test_steps_zero_allows_any_step_size(data):
    model, x, y = data
    lfr_ext.flatness_penalty(model, x, y, eps=0.1, step_size=0.0, steps=0)

"""The input-gradient regularisers' whole training steps: lfr_ext's against double backprop.

One step = the method's loss + backward + SGD step on a fixed batch, for each method of
:mod:`lfr_ext.regularizers` (Gradient Norm, input-gradient regularisation, CURE, GradAlign, LLR,
Jacobian regularisation). Providers:

* ``lfr_ext``: the method with ``hvp="auto"`` (what ``lfr_ext.input_grad`` picks on this device,
  :data:`lfr_ext.input_gradients.AUTO_BY_DEVICE`);
* ``linearized``, ``double_backprop``: the same function with that ``hvp=``;
* ``official``: the transcription of the method's official code (tests/official_penalties.py),
  double backprop as its authors wrote it;
* ``plain``: cross-entropy forward, backward and step, the unit: ``bench/summarize.py`` reports
  each step's median over plain's (one forward and one backward = 1 gradient).

Setups: the authors' MNIST SmallCNN at batch 128 and ResNet-18 at batch 128 on a GPU; on the CPU
the SmallCNN and ResNet-20 (CIFAR size, BatchNorm) at batch 64. ``LFR_BENCH_SETUPS`` selects
setups, ``LFR_BENCH_METHODS`` methods. ``bench/summarize.py`` reports lfr_ext's step over the
official one per method (the goal on a GPU: <= 0.5x; on the CPU: not slower at batch >= 64).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

from bench.utils import BENCH_DEVICE, TINY, environment, synchronized
from lfr_ext import regularizers
from lfr_ext.models import ResNet18, ResNet20, SmallCNN
from tests import official_penalties as official

ON_GPU = BENCH_DEVICE == "cuda"
EPS = 8 / 255

SETUPS = {
    # name: (model factory, input shape without batch, batch)
    "smallcnn_mnist": (lambda: SmallCNN(zero_init_last=False), (1, 28, 28), 128 if ON_GPU else 64),
}
if ON_GPU:
    SETUPS["resnet18_cifar"] = (ResNet18, (3, 32, 32), 128)
else:
    SETUPS["resnet20_cifar"] = (ResNet20, (3, 32, 32), 64)
if TINY:
    SETUPS = {name: (factory, shape, 4) for name, (factory, shape, _) in SETUPS.items()}
SELECTED = [s for s in SETUPS if s in os.environ.get("LFR_BENCH_SETUPS", ",".join(SETUPS)).split(",")]


def _draws(x: torch.Tensor, classes: int) -> dict:
    """The random draws every provider of a step shares (fixed: the providers do the same work)."""
    generator = torch.Generator(device=x.device).manual_seed(1)
    return {
        "eta": torch.empty_like(x).uniform_(-EPS, EPS, generator=generator),
        "delta": torch.empty_like(x).uniform_(-EPS, EPS, generator=generator),
        "v": torch.randn(1, x.shape[0], classes, device=x.device, generator=generator),
    }


# method -> {provider: loss(model, x, y, draws)}; each method's arguments are its defaults where
# they have one, else the value named in its docstring.
METHODS = {
    "gradnorm": {
        "lfr_ext": lambda m, x, y, d, hvp="auto": regularizers.gradient_norm(m, x, y, hvp=hvp).loss,
        "official": lambda m, x, y, d: official.gradnorm_official(m, x, y).loss,
    },
    "igr": {
        "lfr_ext": lambda m, x, y, d, hvp="auto": (
            regularizers.input_gradient_regularization(m, x, y, lam=1e4, hvp=hvp).loss
        ),
        "official": lambda m, x, y, d: official.igr_official(m, x, y, lam=1e4).loss,
    },
    "cure": {
        "lfr_ext": lambda m, x, y, d, hvp="auto": regularizers.cure(m, x, y, h=0.6, hvp=hvp).loss,
        "official": lambda m, x, y, d: official.cure_official(m, x, y, h=0.6).loss,
    },
    "gradalign": {
        "lfr_ext": lambda m, x, y, d, hvp="auto": regularizers.gradalign(m, x, y, eps=EPS, eta=d["eta"], hvp=hvp).loss,
        "official": lambda m, x, y, d: official.gradalign_official(m, x, y, eps=EPS, lam=0.2, eta=d["eta"]).loss,
    },
    "llr": {
        "lfr_ext": lambda m, x, y, d, hvp="auto": (
            regularizers.llr(m, x, y, eps=EPS, weight_decay=2e-4, delta_init=d["delta"], hvp=hvp).loss
        ),
        "official": lambda m, x, y, d: official.llr_official(m, x, y, delta_init=d["delta"], eps=EPS).loss,
    },
    "jacobian": {
        "lfr_ext": lambda m, x, y, d, hvp="auto": (
            regularizers.jacobian_regularization(m, x, y, lam=0.01, v=d["v"], hvp=hvp).loss
        ),
        "official": lambda m, x, y, d: official.jacobian_reg_official(m, x, y, lambda_jr=0.01, v=d["v"]).loss,
    },
}
CHOSEN = [m for m in METHODS if m in os.environ.get("LFR_BENCH_METHODS", ",".join(METHODS)).split(",")]
PROVIDERS = ("lfr_ext", "linearized", "double_backprop", "official")


def _loss_of(method: str, provider: str):
    if provider in ("linearized", "double_backprop"):
        return functools.partial(METHODS[method]["lfr_ext"], hvp=provider)
    return METHODS[method][provider]


def _problem(setup: str):
    factory, shape, batch = SETUPS[setup]
    torch.manual_seed(0)
    model = factory().to(BENCH_DEVICE).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, *shape, device=BENCH_DEVICE)
    y = torch.randint(0, 10, (batch,), device=BENCH_DEVICE)
    return model, optimizer, x, y


def _step(model, optimizer, loss_of):
    def step():
        loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return synchronized(step)


ROUNDS = 1 if TINY else (10 if ON_GPU else 3)


def _record(benchmark, setup, method, provider, x, fn):
    benchmark.group = f"gradient penalties {setup} b{x.shape[0]} ({BENCH_DEVICE})"
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0 if TINY else 1)
    benchmark.extra_info.update(
        environment(), setup=setup, method=method, provider=provider, batch=x.shape[0],
        images_per_s=x.shape[0] / benchmark.stats.stats.median,
    )  # fmt: skip


@pytest.mark.parametrize("setup", SELECTED)
def test_plain_step(benchmark, setup):
    model, optimizer, x, y = _problem(setup)
    _record(benchmark, setup, "plain", "plain", x, _step(model, optimizer, lambda: F.cross_entropy(model(x), y)))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("method", CHOSEN)
@pytest.mark.parametrize("setup", SELECTED)
def test_penalty_step(benchmark, setup, method, provider):
    model, optimizer, x, y = _problem(setup)
    draws = _draws(x, 10)
    loss_of = _loss_of(method, provider)
    _record(benchmark, setup, method, provider, x, _step(model, optimizer, lambda: loss_of(model, x, y, draws)))

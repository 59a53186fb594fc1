"""Whole training steps: LFR against PGD-AT, TRADES and plain training at equal K.

One step = inner maximisation + loss + backward + optimizer step, on a fixed batch. Providers:

* ``plain``, ``pgd_at`` (K), ``trades`` (K): the baselines of :mod:`lfr_ext.training.methods`;
* ``authors_lfr``: a transcription of the authors' LFR loss (double backprop, eager);
* ``lfr_ext``: ``lfr_ext.lfr_loss`` with its defaults (``hvp="auto"``: the linearized pass);
* ``lfr_ext_double_backprop``, ``lfr_ext_linearized``: the same API with that ``hvp=``;
* ``*_captured`` (CUDA only): the step as one CUDA graph (:class:`lfr_ext.CapturedStep` for
  LFR, :class:`lfr_ext.GraphedStep` for the baselines: the same capture, as in ``lfr-train``).

Setups: the authors' MNIST SmallCNN, batch 128, K=40; CIFAR ResNet-18, batch 128,
K=10; the authors' CIFAR ResNet-20, batch 128, K=10; WRN-16-4 with SiLU and the small ConvNeXt and
ViT of :mod:`lfr_ext.models`, batch 128, K=10. On a CPU the ResNets run with a smaller batch
(``LFR_BENCH_CPU_BATCH``, default 16) so the suite finishes; every result records its batch.
``LFR_BENCH_K`` replaces every setup's K and ``LFR_BENCH_SETUPS`` (comma-separated) selects setups.
``extra_info`` holds images/s and the peak CUDA memory of the step: ``peak_memory_mb`` is the
peak allocated from before the step is built (so a captured step's warm-up and capture, whose
allocations become the graph's private pool, are counted), ``graph_pool_mb`` the memory a
graph's pool holds. ``bench/summarize.py`` divides each median by PGD-AT's at the same setup, K
and capture mode.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lfr_ext
from bench.utils import BENCH_DEVICE, CPU_BATCH, TINY, bench_k, environment, synchronized
from lfr_ext.models import ConvNeXtCifar, ResNet18, ResNet20, SmallCNN, ViTCifar, WideResNet
from lfr_ext.training.config import TrainConfig
from lfr_ext.training.methods import pgd_at_step, plain_step, trades_step
from tests.authors_lfr import authors_lfr_loss  # the transcription the tests check against

ON_GPU = BENCH_DEVICE == "cuda"

SETUPS = {
    # name: (model factory, input shape without batch, batch, K, eps, step_size, lam)
    "smallcnn_mnist_k40": (lambda: SmallCNN(zero_init_last=False), (1, 28, 28), 128, 40, 0.3, 0.01, 0.02),
    "resnet18_cifar_k10": (ResNet18, (3, 32, 32), 128 if ON_GPU else CPU_BATCH, 10, 0.031, 0.007, 0.03),
    "resnet20_cifar_k10": (ResNet20, (3, 32, 32), 128 if ON_GPU else CPU_BATCH, 10, 0.031, 0.007, 0.03),
    # Beyond ReLU: SiLU, LayerNorm and GELU, attention.
    "wrn16_4_silu_cifar_k10": (
        lambda: WideResNet(16, 4, activation="silu"),
        (3, 32, 32),
        128 if ON_GPU else CPU_BATCH,
        10,
        0.031,
        0.007,
        0.03,
    ),
    "convnext_tiny_cifar_k10": (ConvNeXtCifar, (3, 32, 32), 128 if ON_GPU else CPU_BATCH, 10, 0.031, 0.007, 0.03),
    "vit_tiny_cifar_k10": (
        lambda: ViTCifar(image_size=32),
        (3, 32, 32),
        128 if ON_GPU else CPU_BATCH,
        10,
        0.031,
        0.007,
        0.03,
    ),
}
if TINY:
    SETUPS = {
        name: (factory, shape, 4, 1, eps, step_size, lam)
        for name, (factory, shape, _, _, eps, step_size, lam) in SETUPS.items()
    }
SELECTED = [s for s in SETUPS if s in os.environ.get("LFR_BENCH_SETUPS", ",".join(SETUPS)).split(",")]


def _problem(setup: str):
    factory, shape, batch, steps, eps, step_size, lam = SETUPS[setup]
    steps = bench_k(steps)
    torch.manual_seed(0)
    model = factory().to(BENCH_DEVICE).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, *shape, device=BENCH_DEVICE)
    y = torch.randint(0, 10, (batch,), device=BENCH_DEVICE)
    cfg = TrainConfig(eps=eps, step_size=step_size, steps=steps, lam=lam)
    return model, optimizer, x, y, cfg


def _eager_step(optimizer, loss_of):
    """One full training step: ``loss_of()``, backward, optimizer step."""

    def step():
        loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def setup_baseline(method, model, optimizer, x, y, cfg):
    return _eager_step(optimizer, lambda: method(model, x, y, cfg).loss), None


def setup_authors_lfr(model, optimizer, x, y, cfg):
    def loss():
        with sdpa_kernel(SDPBackend.MATH):  # attention differentiated twice needs its math backend
            return authors_lfr_loss(
                model, x, y, cfg.lam, step_size=cfg.step_size, epsilon=cfg.eps, perturb_steps=cfg.steps
            )[0]

    return _eager_step(optimizer, loss), None


def setup_lfr_ext(hvp, model, optimizer, x, y, cfg):
    kw = dict(lam=cfg.lam, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps)
    return _eager_step(optimizer, lambda: lfr_ext.lfr_loss(model, x, y, hvp=hvp, validate=False, **kw).loss), None


def setup_baseline_captured(method, model, optimizer, x, y, cfg):
    """The same capture machinery as LFR's (and lfr-train's), GraphedStep, around the baseline's
    ``(x, y) -> (loss, ...)``."""
    step = lfr_ext.GraphedStep(model, optimizer, lambda a, b: method(model, a, b, cfg), x, y)
    assert step.captured, step.reason
    return (lambda: step(x, y)), step.graph


def setup_lfr_ext_captured(model, optimizer, x, y, cfg):
    step = lfr_ext.CapturedStep(
        model, optimizer, x, y, lam=cfg.lam, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps
    )
    assert step.captured, step.reason
    return (lambda: step(x, y)), step.graph


BASELINES = {"pgd_at": pgd_at_step, "plain": plain_step, "trades": trades_step}
# provider -> factory(model, optimizer, x, y, cfg) of (the timed step, its CUDA graph or None)
PROVIDERS = {
    **{name: functools.partial(setup_baseline, method) for name, method in BASELINES.items()},
    "authors_lfr": setup_authors_lfr,
    "lfr_ext_double_backprop": functools.partial(setup_lfr_ext, "double_backprop"),
    "lfr_ext_linearized": functools.partial(setup_lfr_ext, "linearized"),
    "lfr_ext": functools.partial(setup_lfr_ext, "auto"),
}
if ON_GPU:
    PROVIDERS |= {
        f"{name}_captured": functools.partial(setup_baseline_captured, method) for name, method in BASELINES.items()
    }
    PROVIDERS["lfr_ext_captured"] = setup_lfr_ext_captured


def _graph_pool_bytes(graph: torch.cuda.CUDAGraph) -> int:
    """Bytes reserved by the segments of ``graph``'s private memory pool."""
    pool = tuple(graph.pool())
    return sum(
        seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", ())) == pool
    )


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("setup", SELECTED)
def test_training_step(benchmark, setup, provider):
    model, optimizer, x, y, cfg = _problem(setup)
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fn, graph = PROVIDERS[provider](model, optimizer, x, y, cfg)

    benchmark.group = f"step {setup} b{x.shape[0]} ({BENCH_DEVICE})"
    rounds = 1 if TINY else (10 if ON_GPU else 2)
    benchmark.pedantic(synchronized(fn), rounds=rounds, iterations=1, warmup_rounds=0 if TINY else 1)
    benchmark.extra_info.update(
        environment(),
        provider=provider,
        setup=setup,
        batch=x.shape[0],
        steps=cfg.steps,
        images_per_s=x.shape[0] / benchmark.stats.stats.median,
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if ON_GPU else None,
        graph_pool_mb=_graph_pool_bytes(graph) / 2**20 if graph is not None else None,
    )

"""Whole-penalty cost: one ``flatness_penalty`` call against one PGD attack with as many steps.

Setup of the foundation issue: the authors' MNIST SmallCNN, batch 128, K = 40 ascent steps
(eps 0.3, step 0.01). Providers: ``pgd`` (PGD-K, the cost every adversarial-training method
pays), ``authors`` (a transcription of the authors' double-backprop LFR penalty),
``lfr_ext`` (``flatness_penalty`` with its defaults), ``lfr_ext_reference`` (impl="reference").
"""

from __future__ import annotations

import pytest
import torch

import lfr_ext
from lfr_ext.training.methods import pgd_linf_ce
from lfr_ext.models import SmallCNN

from bench.utils import BENCH_DEVICE, TINY, bench_k, environment, synchronized
from tests.authors_lfr import authors_lfr_loss  # the transcription the tests check against

BATCH, STEPS, EPS, STEP_SIZE = 4 if TINY else 128, bench_k(1 if TINY else 40), 0.3, 0.01


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SmallCNN(zero_init_last=False).to(BENCH_DEVICE).train()
    x = torch.rand(BATCH, 1, 28, 28, device=BENCH_DEVICE)
    y = torch.randint(0, 10, (BATCH,), device=BENCH_DEVICE)
    return model, x, y


PROVIDERS = ["pgd", "authors", "lfr_ext", "lfr_ext_reference"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_penalty_vs_pgd(benchmark, setup, provider):
    model, x, y = setup
    kw = dict(eps=EPS, step_size=STEP_SIZE, steps=STEPS)
    if provider == "pgd":
        def fn():
            model.eval()
            out = pgd_linf_ce(model, x, y, **kw)
            model.train()
            return out
    elif provider == "authors":
        def fn():
            return authors_lfr_loss(model, x, y, 0.02, step_size=STEP_SIZE, epsilon=EPS, perturb_steps=STEPS)[2]
    else:
        impl = "reference" if provider == "lfr_ext_reference" else None

        def fn():
            return lfr_ext.flatness_penalty(model, x, y, impl=impl, **kw)

    benchmark.group = f"penalty SmallCNN b{BATCH} K={STEPS} ({BENCH_DEVICE})"
    benchmark.extra_info.update(environment(), provider=provider, batch=BATCH, steps=STEPS)
    rounds = 1 if TINY else (3 if BENCH_DEVICE == "cpu" else 10)
    benchmark.pedantic(synchronized(fn), rounds=rounds, iterations=1, warmup_rounds=0 if TINY else 1)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median

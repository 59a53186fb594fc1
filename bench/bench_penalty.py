"""Whole-penalty cost: one ``flatness_penalty`` call against one PGD attack with as many steps.

Setup: the MNIST experiment of Xu et al. (ICIP 2020; the ``mnist`` preset of
``lfr_ext/training/config.py``): SmallCNN, batch 128, K = 40 ascent steps (eps 0.3, step 0.01);
``LFR_BENCH_K`` sets K (``bench/utils.py``). Providers: ``pgd`` (PGD-K, the cost every
adversarial-training method pays), ``authors`` (a transcription of the authors' double-backprop
LFR penalty), ``lfr_ext`` (``flatness_penalty`` with its defaults), ``lfr_ext_reference``
(impl="reference").
"""

from __future__ import annotations

import functools

import pytest
import torch

import lfr_ext
from bench.utils import BENCH_DEVICE, TINY, bench_k, environment, synchronized
from lfr_ext.models import SmallCNN
from lfr_ext.training.methods import pgd_linf_ce
from tests.authors_lfr import authors_lfr_loss  # the transcription the tests check against

BATCH, STEPS, EPS, STEP_SIZE = 4 if TINY else 128, bench_k(1 if TINY else 40), 0.3, 0.01


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = SmallCNN(zero_init_last=False).to(BENCH_DEVICE).train()
    x = torch.rand(BATCH, 1, 28, 28, device=BENCH_DEVICE)
    y = torch.randint(0, 10, (BATCH,), device=BENCH_DEVICE)
    return model, x, y


def setup_pgd(model, x, y):
    def fn():
        model.eval()
        out = pgd_linf_ce(model, x, y, eps=EPS, step_size=STEP_SIZE, steps=STEPS)
        model.train()
        return out

    return fn


def setup_authors(model, x, y):
    return lambda: authors_lfr_loss(model, x, y, 0.02, step_size=STEP_SIZE, epsilon=EPS, perturb_steps=STEPS)[2]


def setup_lfr_ext(impl, model, x, y):
    return lambda: lfr_ext.flatness_penalty(model, x, y, impl=impl, eps=EPS, step_size=STEP_SIZE, steps=STEPS)


# provider -> factory(model, x, y) of the timed call
PROVIDERS = {
    "pgd": setup_pgd,
    "authors": setup_authors,
    "lfr_ext": functools.partial(setup_lfr_ext, None),
    "lfr_ext_reference": functools.partial(setup_lfr_ext, "reference"),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_penalty_vs_pgd(benchmark, problem, provider):
    model, x, y = problem
    fn = PROVIDERS[provider](model, x, y)
    benchmark.group = f"penalty SmallCNN b{BATCH} K={STEPS} ({BENCH_DEVICE})"
    benchmark.extra_info.update(environment(), provider=provider, batch=BATCH, steps=STEPS)
    rounds = 1 if TINY else (3 if BENCH_DEVICE == "cpu" else 10)
    benchmark.pedantic(synchronized(fn), rounds=rounds, iterations=1, warmup_rounds=0 if TINY else 1)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median

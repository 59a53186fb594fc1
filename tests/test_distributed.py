"""LFR and the baselines on DistributedDataParallel, 2 gloo ranks, fp64.

Exact means: after one ``backward()`` each rank's gradient equals the mean of the per-rank
single-process gradients (each rank's share of the batch, its own RNG draws), with the fast
engine still in use. And the wrappers with which a step would be silently wrong are refused."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lfr_ext
from lfr_ext.models import SmallCNN
from lfr_ext.training.config import TrainConfig
from lfr_ext.training.methods import METHOD_STEPS

from dist_helpers import relative_errors, run_on_ranks
from models_for_tests import TinyResNet

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

CFG = TrainConfig(eps=0.1, step_size=0.03, steps=3, lam=0.05)
MODELS = {"small_cnn": (lambda: SmallCNN(drop=0.0, zero_init_last=False), (1, 28, 28), 10),
          "resnet_bn": (lambda: TinyResNet(drop=0.0), (3, 10, 10), 5)}


def _batch(name, world):
    factory, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = factory().double().train()
    torch.manual_seed(1)
    x = torch.rand(4 * world, *shape, dtype=torch.float64)
    y = torch.randint(0, classes, (4 * world,))
    return model, x.chunk(world), y.chunk(world)


def _loss(method, model, x, y, rank):
    torch.manual_seed(100 + rank)  # the rank's own draws (start noise, PGD's random start)
    return METHOD_STEPS[method](model, x, y, CFG).loss


def _exact_on_ranks(rank, world, method):
    for name in MODELS:
        for ddp_kwargs in ({}, {"find_unused_parameters": True}):
            model, xs, ys = _batch(name, world)
            reference = copy.deepcopy(model)
            ddp = DistributedDataParallel(model, **ddp_kwargs)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _loss(method, ddp, xs[rank], ys[rank], rank).backward()
            fallbacks = [str(w.message) for w in caught if "falls back" in str(w.message)]
            assert not fallbacks, (name, ddp_kwargs, fallbacks)  # the linearized engine stayed in use
            got = [p.grad for p in model.parameters()]
            per_rank = []
            for r in range(world):
                single = copy.deepcopy(reference)
                per_rank.append(torch.autograd.grad(_loss(method, single, xs[r], ys[r], r), list(single.parameters())))
            expected = [sum(grads) / world for grads in zip(*per_rank)]
            errors = relative_errors(got, expected)
            assert max(errors) < 1e-12, (method, name, ddp_kwargs, max(errors))


@pytest.mark.parametrize("method", ["lfr", "pgd_at", "trades"])
def test_ddp_gradient_is_the_mean_of_per_rank_gradients(method):
    run_on_ranks(_exact_on_ranks, 2, method)


def _refusals_on_ranks(rank, world):
    model, xs, ys = _batch("resnet_bn", world)
    x, y = xs[rank], ys[rank]
    kw = dict(lam=0.05, eps=0.1, step_size=0.03, steps=2)
    with pytest.raises(ValueError, match="static_graph"):
        lfr_ext.lfr_loss(DistributedDataParallel(copy.deepcopy(model), static_graph=True), x, y, **kw)
    # (DDP takes SyncBatchNorm on GPU modules only, and its train-mode forward needs a GPU: the
    # check comes first, on the bare module.)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    with pytest.raises(ValueError, match="SyncBatchNorm in train mode"):
        lfr_ext.lfr_loss(synced, x, y, **kw)
    with pytest.raises(ValueError, match="SyncBatchNorm in train mode"):
        lfr_ext.flatness_penalty(synced, x, y, eps=0.1, step_size=0.03, steps=2)
    synced.eval()  # eval-mode SyncBatchNorm is plain BatchNorm: allowed
    assert lfr_ext.flatness_penalty(synced, x, y, eps=0.1, step_size=0.03, steps=2).isfinite()
    assert lfr_ext.local_flatness(synced.train(), x, y, eps=0.1, step_size=0.03, steps=2).shape == (len(x),)

    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(copy.deepcopy(model))
    with pytest.raises(NotImplementedError, match="FSDP2"):
        lfr_ext.lfr_loss(sharded, x, y, **kw)


def test_wrappers_that_would_be_wrong_are_refused():
    run_on_ranks(_refusals_on_ranks, 2)

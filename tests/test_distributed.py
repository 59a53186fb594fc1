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

from conftest import requires_cuda
from dist_helpers import free_port, relative_errors, run_on_ranks
from models_for_tests import TinyResNet
from test_captured import exact_fp32  # noqa: F401  (fixture: TF32 off, restored)

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


def _running_statistics_on_ranks(rank, world):
    from lfr_ext.training import parallel

    ranks = parallel.Ranks(rank, world)
    model = TinyResNet()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.fill_(float(rank))
            bn.running_var.fill_(1.0 + 2 * rank)
    parallel.average_running_statistics(model, ranks)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.running_mean, torch.full_like(bn.running_mean, (world - 1) / 2))
        assert torch.equal(bn.running_var, torch.full_like(bn.running_var, float(world)))
    gathered = parallel.gather_objects({"rank": rank}, ranks)
    assert gathered == [{"rank": r} for r in range(world)]


def test_running_statistics_averaged_across_ranks():
    run_on_ranks(_running_statistics_on_ranks, 2)


def test_global_batches_are_split_evenly_and_tiny_ones_skipped():
    from lfr_ext.training import parallel

    two = [parallel.Ranks(r, 2) for r in range(2)]
    batch = torch.arange(10, 18)
    assert [parallel.shard(batch, r).tolist() for r in two] == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert parallel.shard(torch.arange(1), two[1]) is None  # no equal shares: skipped on every rank
    assert parallel.shard(torch.arange(7), two[0]) is None
    assert parallel.shard(batch, parallel.Ranks()) is batch
    assert len({parallel.rank_seed(0, r) for r in range(8)}) == 8


@requires_cuda
def test_ddp_with_nccl_on_one_gpu_is_captured_and_steps_like_eager(exact_fp32):
    """The GPU stand-in for many GPUs: NCCL at world size 1. CapturedStep captures a DDP model
    on its own parameters (DDP's hooks), after DDP's warm-up, and replays what eager steps do."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        _captured_ddp_steps_like_eager()  # its DDP is freed before the process group (see bench_scale_out)
    finally:
        dist.destroy_process_group()


def _captured_ddp_steps_like_eager():
    from lfr_ext.training.parallel import data_parallel

    torch.manual_seed(0)
    model = SmallCNN(drop=0.3, zero_init_last=False).cuda().train()
    twin = copy.deepcopy(model)
    x, y = torch.rand(8, 1, 28, 28, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    kw = dict(lam=0.02, eps=0.1, step_size=0.02, steps=3)
    ddp = data_parallel(model, torch.device("cuda", 0))
    step = lfr_ext.CapturedStep(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), x, y, **kw)
    assert step.captured, step.reason
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(3)
    got = [step(x, y).loss.clone() for _ in range(2)]
    torch.manual_seed(3)
    expected = []
    for _ in range(2):
        out = lfr_ext.lfr_loss(twin, x, y, **kw)
        twin_opt.zero_grad()
        out.loss.backward()
        twin_opt.step()
        expected.append(out.loss.detach())
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-4, atol=1e-6)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_data_parallel_is_refused():
    model, xs, ys = _batch("small_cnn", 1)
    with pytest.raises(NotImplementedError, match="use DistributedDataParallel"):
        lfr_ext.flatness_penalty(nn.DataParallel(model), xs[0], ys[0], eps=0.1, step_size=0.03, steps=1)

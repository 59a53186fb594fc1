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
from tests.dist_helpers import free_port, relative_errors, run_on_ranks
from tests.models_for_tests import TinyResNet
from tests.utils import requires_cuda

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

CFG = TrainConfig(eps=0.1, step_size=0.03, steps=3, lam=0.05)
MODELS = {
    "small_cnn": (lambda: SmallCNN(drop=0.0, zero_init_last=False), (1, 28, 28), 10),
    "resnet_bn": (lambda: TinyResNet(drop=0.0), (3, 10, 10), 5),
}


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
        if method == "cure" and name == "resnet_bn":
            # CURE's penalty runs in eval mode after the step's train-mode forward: under DDP it reads
            # rank 0's running statistics (what a forward through the wrapper broadcasts), which
            # per-rank replicas do not have; small_cnn, without BatchNorm, is exact.
            continue
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


@pytest.mark.parametrize("method", ["lfr", "pgd_at", "trades", "gradnorm", "igr", "cure", "gradalign", "llr"])
def test_ddp_gradient_is_the_mean_of_per_rank_gradients(method):
    run_on_ranks(_exact_on_ranks, 2, method)


def _ddp_buffers_on_ranks(rank, world, method):
    """Two SGD steps on a BatchNorm model under DDP with its default buffer broadcast, against
    single-process replicas that each start every step from rank 0's buffers (DDP's contract:
    its forward broadcasts them) and step with the mean of their gradients. The inner
    maximisation runs on ``ddp.module`` before the wrapper's forward, so it must see rank 0's
    running statistics too; LFR's replicas use double backprop."""
    model, xs, ys = _batch("resnet_bn", world)
    replicas = [copy.deepcopy(model) for _ in range(world)]
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    replica_opts = [torch.optim.SGD(r.parameters(), lr=0.5) for r in replicas]
    for step in range(2):
        opt.zero_grad()
        _method_step(method, ddp, xs[rank], ys[rank], rank, "auto").loss.backward()
        got = [p.grad.clone() for p in model.parameters()]
        rank0_buffers = [b.clone() for b in replicas[0].buffers()]
        per_rank = []
        for r, replica in enumerate(replicas):
            with torch.no_grad():
                for b, b0 in zip(replica.buffers(), rank0_buffers):
                    b.copy_(b0)
            replica_loss = _method_step(method, replica, xs[r], ys[r], r, "double_backprop").loss
            per_rank.append(torch.autograd.grad(replica_loss, list(replica.parameters())))
        expected = [sum(grads) / world for grads in zip(*per_rank)]
        assert max(relative_errors(got, expected)) < 1e-10, (method, step, max(relative_errors(got, expected)))
        for b, b_replica in zip(model.buffers(), replicas[rank].buffers()):  # (parameters differ by rounding)
            torch.testing.assert_close(b, b_replica, rtol=1e-12, atol=1e-15, msg=f"{method} step {step}")
        opt.step()
        for replica, replica_opt in zip(replicas, replica_opts):
            for p, g in zip(replica.parameters(), expected):
                p.grad = g.clone()
            replica_opt.step()


@pytest.mark.parametrize("method", ["lfr", "pgd_at", "trades"])
def test_ddp_inner_maximisation_sees_the_buffers_ddp_broadcasts(method):
    run_on_ranks(_ddp_buffers_on_ranks, 2, method)


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


def test_wrappers_that_would_be_wrong_are_refused():
    run_on_ranks(_refusals_on_ranks, 2)


def _fully_sharded(model, layout):
    """FSDP2 on ``model``: as one unit ("root") or each child with parameters first ("layers")."""
    from torch.distributed.fsdp import fully_shard

    if layout == "layers":
        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
    return fully_shard(model)


def _reshard_settings(model):
    from lfr_ext._fsdp_state import param_groups as _param_groups
    from lfr_ext.wrapped import sharded_modules

    return [
        (g.post_forward_mesh_info, g.reshard_after_backward) for m in sharded_modules(model) for g in _param_groups(m)
    ]


def _fsdp2_exact_on_ranks(rank, world, method, layout):
    """Two SGD steps of ``method`` on an FSDP2 model against ``world`` single-process replicas
    (each with its rank's share of the batch and its own BatchNorm buffers) stepping with the
    mean of their gradients; LFR's replicas use the authors' double backprop."""
    from torch.distributed.tensor import DTensor

    for name in MODELS:
        model, xs, ys = _batch(name, world)
        replicas = [copy.deepcopy(model) for _ in range(world)]
        sharded = _fully_sharded(model, layout)
        opt = torch.optim.SGD(sharded.parameters(), lr=0.1)  # on the sharded parameters
        with torch.no_grad():  # FSDP's root initialisation (its own settings) happens at the first forward
            sharded.eval()(xs[rank])
        sharded.train()
        settings = _reshard_settings(sharded)
        replica_opts = [torch.optim.SGD(r.parameters(), lr=0.1) for r in replicas]
        for step in range(2):
            opt.zero_grad()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = _method_step(method, sharded, xs[rank], ys[rank], rank, "auto")
                out.loss.backward()
            fallbacks = [str(w.message) for w in caught if "falls back" in str(w.message)]
            assert not fallbacks, (name, fallbacks)  # the linearized engine stayed in use
            assert all(isinstance(p, DTensor) for p in sharded.parameters()), "not resharded after the backward"
            assert _reshard_settings(sharded) == settings
            got = [p.grad.full_tensor() for p in sharded.parameters()]
            per_rank = []
            for r, (replica, replica_opt) in enumerate(zip(replicas, replica_opts)):
                replica_out = _method_step(method, replica, xs[r], ys[r], r, "double_backprop")
                per_rank.append(torch.autograd.grad(replica_out.loss, list(replica.parameters())))
                if r == rank:
                    torch.testing.assert_close(
                        out.loss, replica_out.loss, rtol=1e-12, atol=0, msg=f"{name} step {step}"
                    )
            expected = [sum(grads) / world for grads in zip(*per_rank)]
            errors = relative_errors(got, expected)
            assert max(errors) < 1e-12, (method, name, layout, step, max(errors))
            opt.step()
            for replica, replica_opt in zip(replicas, replica_opts):
                for p, g in zip(replica.parameters(), expected):
                    p.grad = g.clone()
                replica_opt.step()


def _method_step(method, model, x, y, rank, hvp):
    torch.manual_seed(100 + rank)
    if method == "lfr":
        return lfr_ext.lfr_loss(
            model, x, y, lam=CFG.lam, eps=CFG.eps, step_size=CFG.step_size, steps=CFG.steps, hvp=hvp
        )
    return METHOD_STEPS[method](model, x, y, CFG)


@pytest.mark.parametrize("layout", ["root", "layers"])
@pytest.mark.parametrize("method", ["lfr", "pgd_at"])
def test_fsdp2_steps_like_the_mean_of_per_rank_gradients(method, layout):
    run_on_ranks(_fsdp2_exact_on_ranks, 2, method, layout)


def _fsdp2_protocol_on_ranks(rank, world):
    """No LFR call leaves an FSDP2 model unsharded or with other settings than it had."""
    from torch.distributed.tensor import DTensor

    model, xs, ys = _batch("resnet_bn", world)
    sharded = _fully_sharded(model, "layers")
    sharded.set_reshard_after_backward(False, recurse=False)  # a setting of the caller's, to be kept
    settings = _reshard_settings(sharded)
    kw = dict(eps=0.1, step_size=0.03, steps=2)
    x, y = xs[rank], ys[rank]

    def resharded():
        return all(isinstance(p, DTensor) for p in sharded.parameters()) and _reshard_settings(sharded) == settings

    assert lfr_ext.local_flatness(sharded, x, y, **kw).shape == (len(x),) and resharded()
    with pytest.raises(ValueError, match="one loss per sample"):
        lfr_ext.lfr_loss(sharded, x, y, lam=0.1, loss_fn=lambda logits, y: logits.sum(), **kw)
    assert resharded()
    penalty = lfr_ext.flatness_penalty(sharded, x, y, **kw)
    assert not resharded()  # open until the backward that consumes it
    penalty.backward()
    assert resharded() and all(p.grad is not None for p in sharded.parameters())
    # Two calls before one backward share one step; the backward closes it.
    total = lfr_ext.lfr_loss(sharded, x, y, lam=0.1, **kw).loss + lfr_ext.flatness_penalty(sharded, x, y, **kw)
    total.backward()
    assert resharded()
    # A step's losses backpropagated one by one: the last backward closes it.
    out = lfr_ext.lfr_loss(sharded, x, y, lam=0.1, **kw)
    out.natural_loss.backward(retain_graph=True)
    assert not resharded()
    out.penalty.backward()
    assert resharded()
    with pytest.raises(NotImplementedError, match="FSDP2"):
        lfr_ext.CapturedStep(sharded, torch.optim.SGD(sharded.parameters(), lr=0.1), x, y, lam=0.1, **kw)

    # A penalty only logged, then plain steps: the forward after an optimizer step must not use
    # the step's stale unsharded copies.
    opt = torch.optim.SGD(sharded.parameters(), lr=0.5)
    logged = lfr_ext.flatness_penalty(sharded, x, y, **kw).item()
    assert logged > 0
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(sharded(x), y).backward()
        opt.step()
    replica = _batch("resnet_bn", world)[0]  # the unsharded architecture, given the sharded truth
    with torch.no_grad():
        truth = [p.full_tensor() for p in sharded.parameters()]
        sharded.eval()
        got = sharded(x)
        for p, value in zip(replica.parameters(), truth):
            p.copy_(value)
        for b, value in zip(replica.buffers(), sharded.buffers()):
            b.copy_(value)
        torch.testing.assert_close(got, replica.eval()(x), rtol=1e-12, atol=1e-12)
    sharded.train()


def _fsdp2_mixed_precision_on_ranks(rank, world):
    """Under a MixedPrecisionPolicy FSDP casts a module's inputs before wrapping them: the
    linearized engine still sees through (no fallback) and matches double backprop."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, xs, ys = _batch("small_cnn", world)  # (an fp64 BatchNorm's buffers would not follow the cast)
    policy = MixedPrecisionPolicy(param_dtype=torch.float32)
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mp_policy=policy)
    sharded = fully_shard(model, mp_policy=policy)
    kw = dict(eps=0.1, step_size=0.03, steps=2, init_std=0.0)
    x, y = xs[rank], ys[rank]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = lfr_ext.flatness_penalty(sharded, x, y, **kw)
    assert not [w for w in caught if "falls back" in str(w.message)], [str(w.message) for w in caught]
    fast.backward()
    exact = lfr_ext.flatness_penalty(sharded, x, y, hvp="double_backprop", **kw)
    exact.backward()
    torch.testing.assert_close(fast.double(), exact.double(), rtol=1e-5, atol=0)


def test_fsdp2_mixed_precision_keeps_the_fast_engine():
    run_on_ranks(_fsdp2_mixed_precision_on_ranks, 2)


def test_fsdp2_steps_leave_the_model_sharded_with_its_settings():
    run_on_ranks(_fsdp2_protocol_on_ranks, 2)


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

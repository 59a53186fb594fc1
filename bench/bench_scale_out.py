"""Scaling out an LFR step: data-parallel ranks, torch.compile, mixed precision.

* ``test_data_parallel_scaling``: one LFR training step (SmallCNN, global batch 128, K = 10) on
  1 and on 2 ranks (gloo on the CPU, NCCL on GPUs; each rank one process, one CPU thread or one
  GPU), the global batch split across them. ``extra_info`` holds the median step time inside the
  ranks; ``bench/summarize.py`` computes the strong-scaling efficiency ``T1 / (2 T2)`` from the
  two results. (On the CPU two processes share the machine's cores: the figure says what DDP's
  overhead costs there.)
* ``test_lfr_step_variants``: the same step eagerly (linearized engine), with ``hvp="compiled"``
  (each inner step and the penalty step compiled whole), captured (``CapturedStep``, GPU), in bf16
  autocast (CPU and GPU, captured on a GPU) and fp16 autocast with a GradScaler (GPU, eager).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lfr_ext
from bench.utils import BENCH_DEVICE, TINY, bench_k, environment, synchronized
from lfr_ext.models import SmallCNN
from tests.dist_helpers import free_port

ON_GPU = BENCH_DEVICE == "cuda"
BATCH, STEPS = 8 if TINY else 128, bench_k(1 if TINY else 10)
KW = dict(lam=0.02, eps=0.3, step_size=0.03, steps=STEPS)
ROUNDS = 1 if TINY else (10 if ON_GPU else 3)


def _problem(device, batch=BATCH, seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(zero_init_last=False).to(device).train()
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), x, y


def _eager_step(model, optimizer, **extra):
    def step(x, y):
        out = lfr_ext.lfr_loss(model, x, y, validate=False, **KW, **extra)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def _timed_ranks(rank, world, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if ON_GPU else torch.device("cpu")
    dist.init_process_group("nccl" if ON_GPU else "gloo", rank=rank, world_size=world)
    try:
        median = _median_step_on_this_rank(rank, world, device)
        if rank == 0:
            with open(result_path, "w") as f:
                f.write(str(median))
    finally:
        # DDP's reducer must be gone before the process group: freeing it after
        # destroy_process_group() deadlocks gloo's worker threads on the GIL.
        dist.destroy_process_group()


def _median_step_on_this_rank(rank, world, device) -> float:
    model, optimizer, x, y = _problem(device, BATCH)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if ON_GPU else None)
    step = _eager_step(ddp, optimizer)
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    times = []
    for _ in range(ROUNDS + 1):  # the first is warm-up
        dist.barrier()
        start = time.perf_counter()
        step(xs, ys)
        if ON_GPU:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _step_seconds_on(world: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "median")
        mp.spawn(_timed_ranks, args=(world, free_port(), path), nprocs=world, join=True)
        with open(path) as f:
            return float(f.read())


@pytest.mark.parametrize("world", [1, 2])
def test_data_parallel_scaling(benchmark, world):
    if ON_GPU and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    seconds = {}

    def run():
        seconds["median"] = _step_seconds_on(world)

    benchmark.group = f"LFR step, DDP ranks, SmallCNN global batch {BATCH} K={STEPS} ({BENCH_DEVICE})"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(
        environment(),
        world_size=world,
        global_batch=BATCH,
        steps=STEPS,
        threads_per_rank=1,
        step_median_s=seconds["median"],
        images_per_s=BATCH / seconds["median"],
    )


def setup_eager(model, optimizer, x, y, **extra):
    eager = _eager_step(model, optimizer, **extra)
    return lambda: eager(x, y)


def setup_bf16(model, optimizer, x, y):
    eager = _eager_step(model, optimizer)

    def fn():
        with torch.autocast(BENCH_DEVICE, dtype=torch.bfloat16):
            eager(x, y)

    return fn


def setup_captured(model, optimizer, x, y):
    step = lfr_ext.CapturedStep(model, optimizer, x, y, **KW)
    assert step.captured, step.reason
    return lambda: step(x, y)


def setup_bf16_captured(model, optimizer, x, y):
    def objective(a, b):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return lfr_ext.lfr_loss(model, a, b, validate=False, **KW)

    step = lfr_ext.GraphedStep(model, optimizer, objective, x, y)
    assert step.captured, step.reason
    return lambda: step(x, y)


def setup_fp16(model, optimizer, x, y):
    scaler = torch.amp.GradScaler("cuda")

    def fn():
        with torch.autocast("cuda", dtype=torch.float16):
            out = lfr_ext.lfr_loss(model, x, y, validate=False, grad_scaler=scaler, **KW)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return fn


# variant -> factory(model, optimizer, x, y) of the timed step
VARIANTS = {
    "eager": setup_eager,
    "compiled": functools.partial(setup_eager, hvp="compiled"),
    "bf16": setup_bf16,
}
if ON_GPU:
    VARIANTS |= {"captured": setup_captured, "bf16_captured": setup_bf16_captured, "fp16": setup_fp16}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lfr_step_variants(benchmark, variant):
    model, optimizer, x, y = _problem(BENCH_DEVICE)
    fn = VARIANTS[variant](model, optimizer, x, y)
    fn()  # compile / warm up outside the timing
    benchmark.group = f"LFR step variants, SmallCNN b{BATCH} K={STEPS} ({BENCH_DEVICE})"
    benchmark.pedantic(synchronized(fn), rounds=ROUNDS, iterations=1, warmup_rounds=0 if TINY else 1)
    benchmark.extra_info.update(
        environment(), variant=variant, batch=BATCH, steps=STEPS, images_per_s=BATCH / benchmark.stats.stats.median
    )

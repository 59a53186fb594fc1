"""The fused LFR ascent step (``lfr_ext.ops.ascent_step``) against the PyTorch chain it replaces.

Providers:

* ``reference``: the eager chain (:func:`lfr_ext.reference.ascent_step_reference`), 8+ kernels;
* ``compiled``: ``torch.compile`` of that same chain (Inductor fuses the elementwise part);
* ``cpu`` / ``cuda`` / ``triton``: the lfr_ext kernels (one pass over memory).

Shapes (B, C, H, W): MNIST (128, 1, 28, 28), CIFAR (128, 3, 32, 32), ImageNet (256, 3, 224, 224);
fp32 and bf16; q = 1, no sign(g) output. A provider that cannot run here is skipped, and so is
Triton on CPU tensors (the interpreter is a testing aid, not a fast path).

Timing: pytest-benchmark's own rounds (``synchronized``: the device work is inside the timed
call). On a GPU ``extra_info`` also holds ``triton.testing.do_bench`` quantiles (CUDA events,
L2 flushed between runs). ``extra_info`` reports the median time, the achieved bandwidth
``bytes / time`` where ``bytes`` are the step's unavoidable traffic (read x, x', h, g; write x'
and the (B,) norms: 5 tensors), and that bandwidth as a fraction of the measured copy bandwidth
(``dst.copy_(src)`` of a 1 GiB buffer on the same device, 2 bytes moved per byte copied), i.e.
how close the step is to the memory-bandwidth floor.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import time

import pytest
import torch

import lfr_ext
from lfr_ext.reference import ascent_step_reference

from conftest import BENCH_DEVICE, environment, synchronized

SHAPES = {"mnist": (128, 1, 28, 28), "cifar": (128, 3, 32, 32), "imagenet": (256, 3, 224, 224)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ["reference", "compiled", "cpu", "cuda", "triton"]
EPS, STEP_SIZE, LO, HI, Q = 8 / 255, 2 / 255, 0.0, 1.0, 1


def _skip_reason(provider: str, dtype: torch.dtype) -> str | None:
    if provider in ("reference", "compiled"):
        return None
    device = torch.device(BENCH_DEVICE)
    if provider == "triton" and device.type == "cpu":
        return "Triton on CPU tensors is the interpreter (a testing aid): not benchmarked"
    return lfr_ext._registry.unavailable_reason(provider, device, dtype)


@functools.lru_cache(maxsize=None)
def copy_bandwidth_bytes_per_s() -> float:
    """Measured ``dst.copy_(src)`` bandwidth on the bench device: 2 x bytes / median time."""
    n = 2**30 // 4 if BENCH_DEVICE == "cuda" else 2**28 // 4  # 1 GiB on a GPU, 256 MiB on a CPU
    src = torch.rand(n, device=BENCH_DEVICE)
    dst = torch.empty_like(src)
    copy = synchronized(lambda: dst.copy_(src))
    copy()
    times = []
    for _ in range(20 if BENCH_DEVICE == "cuda" else 5):
        start = time.perf_counter()
        copy()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def _inputs(shape, dtype):
    gen = torch.Generator(device=BENCH_DEVICE).manual_seed(0)
    x = torch.rand(shape, generator=gen, device=BENCH_DEVICE, dtype=torch.float32)
    x_adv = (x + 0.02 * torch.randn(shape, generator=gen, device=BENCH_DEVICE)).clamp(0, 1)
    h = torch.randn(shape, generator=gen, device=BENCH_DEVICE)
    g = torch.randn(shape, generator=gen, device=BENCH_DEVICE)
    return [t.to(dtype) for t in (x, x_adv, h, g)]


def _step_fn(provider: str, inputs):
    x, x_adv, h, g = inputs
    if provider == "reference":
        return lambda: ascent_step_reference(x, x_adv, h, g, EPS, STEP_SIZE, LO, HI, Q)
    if provider == "compiled":
        chain = torch.compile(
            lambda x, x_adv, h, g: ascent_step_reference(x, x_adv, h, g, EPS, STEP_SIZE, LO, HI, Q), fullgraph=True
        )
        return lambda: chain(x, x_adv, h, g)
    return lambda: lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=EPS, step_size=STEP_SIZE, lo=LO, hi=HI, q=Q,
                                           impl=provider)


def _do_bench_quantiles(fn) -> list[float] | None:
    """GPU: [median, q20, q80] in ms from triton.testing.do_bench (CUDA events), if triton is here."""
    if BENCH_DEVICE != "cuda" or importlib.util.find_spec("triton") is None:
        return None
    from triton.testing import do_bench

    return list(do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8]))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_ascent_step(benchmark, shape_name, dtype_name, provider):
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    reason = _skip_reason(provider, dtype)
    if reason:
        pytest.skip(reason)
    inputs = _inputs(shape, dtype)
    fn = synchronized(_step_fn(provider, inputs))
    fn()  # compile / warm up outside the timing

    numel = inputs[0].numel()
    useful_bytes = (5 * numel + shape[0]) * inputs[0].element_size()
    big = numel > 10**7
    rounds = (5 if big else 50) if BENCH_DEVICE == "cpu" else (20 if big else 200)
    benchmark.group = f"ascent_step {shape_name} {tuple(shape)} {dtype_name} ({BENCH_DEVICE})"
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)

    median_s = benchmark.stats.stats.median
    quantiles = _do_bench_quantiles(_step_fn(provider, inputs))
    if quantiles is not None:
        median_s = quantiles[0] / 1e3  # CUDA-event timing supersedes the host clock on a GPU
    copy_bw = copy_bandwidth_bytes_per_s()
    benchmark.extra_info.update(
        environment(),
        provider=provider,
        shape=list(shape),
        dtype=dtype_name,
        cpu_threads=torch.get_num_threads(),
        median_us=median_s * 1e6,
        do_bench_ms_median_q20_q80=quantiles,
        useful_bytes=useful_bytes,
        achieved_GBps=useful_bytes / median_s / 1e9,
        copy_bandwidth_GBps=copy_bw / 1e9,
        fraction_of_copy_bandwidth=useful_bytes / median_s / copy_bw,
        floor_us=useful_bytes / copy_bw * 1e6,
    )

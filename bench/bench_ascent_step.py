"""The fused LFR ascent step (``lfr_ext.ops.ascent_step``) against the PyTorch chain it replaces.

Providers:

* ``reference``: the eager chain (:func:`lfr_ext.reference.ascent_step_reference`), 8+ kernels;
* ``compiled``: ``torch.compile`` of that same chain (Inductor fuses the elementwise part);
* ``cpu`` / ``cuda`` / ``triton``: the lfr_ext kernels (one pass over memory).

Shapes (B, C, H, W): MNIST (128, 1, 28, 28), CIFAR (128, 3, 32, 32), ImageNet (256, 3, 224, 224);
fp32 and bf16; q = 1, no sign(g) output. A provider that cannot run here is skipped, and so is
Triton on CPU tensors (the interpreter is a testing aid, not a fast path).

Timing, two figures per provider, both in ``extra_info``:

* ``device_us``: device time per call (``triton.testing.do_bench``: CUDA events, L2 flushed,
  median), what the kernel itself costs;
* ``host_inclusive_us``: N calls back to back, one sync, divided by N: what a training loop
  pays per call, Python, dispatch and launch included (``do_bench`` hides these: the launch
  overlaps the cache-clearing kernel it runs before each call). The <= 10 us goal at MNIST size
  is judged on this one.

pytest-benchmark's own rounds time one call plus a sync. The copy-bandwidth ceiling
(``dst.copy_(src)`` of a 1 GiB buffer on a GPU, 256 MiB on a CPU, 2 bytes moved per byte copied)
is timed the same two ways; ``fraction_of_copy_bandwidth`` compares the step's achieved
bandwidth ``bytes / device time``, where ``bytes`` are the step's unavoidable traffic (read x,
x', h, g; write x' and the (B,) norms: 5 tensors), with the copy's ``bytes / device time``:
how close the step is to the memory-bandwidth floor.
"""

from __future__ import annotations

import functools

import pytest
import torch

import lfr_ext
from bench.utils import (
    BENCH_DEVICE,
    TINY,
    device_seconds_per_call,
    environment,
    host_inclusive_seconds_per_call,
    synchronized,
)
from lfr_ext.reference import ascent_step_reference

SHAPES = {"mnist": (128, 1, 28, 28), "cifar": (128, 3, 32, 32), "imagenet": (256, 3, 224, 224)}
if TINY:
    SHAPES = {"mnist": (8, 1, 28, 28), "cifar": (4, 3, 32, 32), "imagenet": (2, 3, 64, 64)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPS, STEP_SIZE, LO, HI, Q = 8 / 255, 2 / 255, 0.0, 1.0, 1


def _skip_reason(provider: str, dtype: torch.dtype) -> str | None:
    if provider in ("reference", "compiled"):
        return None
    device = torch.device(BENCH_DEVICE)
    if provider == "triton" and device.type == "cpu":
        return "Triton on CPU tensors is the interpreter (a testing aid): not benchmarked"
    return lfr_ext._impl.unavailable_reason(provider, device, dtype)


@functools.lru_cache(maxsize=None)
def copy_bandwidth() -> dict:
    """``dst.copy_(src)`` on the bench device, timed as the ops are: bytes moved per second of
    device time and of host-inclusive time."""
    n = (2**30 if BENCH_DEVICE == "cuda" else 2**28) // 4 // (64 if TINY else 1)
    src = torch.rand(n, device=BENCH_DEVICE)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    calls = 2 if TINY else (20 if BENCH_DEVICE == "cuda" else 5)
    device_s = device_seconds_per_call(lambda: dst.copy_(src), calls)
    host_s = host_inclusive_seconds_per_call(lambda: dst.copy_(src), calls)
    return {"bytes": moved, "device_Bps": moved / device_s, "host_inclusive_Bps": moved / host_s}


def _inputs(shape, dtype):
    gen = torch.Generator(device=BENCH_DEVICE).manual_seed(0)
    x = torch.rand(shape, generator=gen, device=BENCH_DEVICE, dtype=torch.float32)
    x_adv = (x + 0.02 * torch.randn(shape, generator=gen, device=BENCH_DEVICE)).clamp(0, 1)
    h = torch.randn(shape, generator=gen, device=BENCH_DEVICE)
    g = torch.randn(shape, generator=gen, device=BENCH_DEVICE)
    return [t.to(dtype) for t in (x, x_adv, h, g)]


def setup_reference(x, x_adv, h, g):
    return lambda: ascent_step_reference(x, x_adv, h, g, EPS, STEP_SIZE, LO, HI, Q)


def setup_compiled(x, x_adv, h, g):
    chain = torch.compile(
        lambda x, x_adv, h, g: ascent_step_reference(x, x_adv, h, g, EPS, STEP_SIZE, LO, HI, Q), fullgraph=True
    )
    return lambda: chain(x, x_adv, h, g)


def setup_kernel(impl, x, x_adv, h, g):
    return lambda: lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=EPS, step_size=STEP_SIZE, lo=LO, hi=HI, q=Q, impl=impl)


# provider -> factory(x, x_adv, h, g) of the timed call
PROVIDERS = {
    "reference": setup_reference,
    "compiled": setup_compiled,
    **{impl: functools.partial(setup_kernel, impl) for impl in ("cpu", "cuda", "triton")},
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_ascent_step(benchmark, shape_name, dtype_name, provider):
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    reason = _skip_reason(provider, dtype)
    if provider == "compiled" and dtype_name != "fp32":
        reason = "torch.compile of the chain is compared in fp32 only (each compile costs seconds)"
    if TINY and provider == "compiled" and shape_name != "mnist":
        reason = "tiny run: torch.compile is exercised at one size only"
    if reason:
        pytest.skip(reason)
    inputs = _inputs(shape, dtype)
    step = PROVIDERS[provider](*inputs)
    fn = synchronized(step)
    fn()  # compile / warm up outside the timing

    numel = inputs[0].numel()
    useful_bytes = (5 * numel + shape[0]) * inputs[0].element_size()
    big = numel > 10**7
    rounds = 1 if TINY else ((5 if big else 50) if BENCH_DEVICE == "cpu" else (20 if big else 200))
    benchmark.group = f"ascent_step {shape_name} {tuple(shape)} {dtype_name} ({BENCH_DEVICE})"
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if TINY else 2)

    calls = 2 if TINY else (10 if big else (500 if BENCH_DEVICE == "cuda" else 50))
    device_s = device_seconds_per_call(step, calls)
    host_s = host_inclusive_seconds_per_call(step, calls)
    copy = copy_bandwidth()
    achieved = useful_bytes / device_s
    benchmark.extra_info.update(
        environment(),
        provider=provider,
        shape=list(shape),
        dtype=dtype_name,
        cpu_threads=torch.get_num_threads(),
        device_us=device_s * 1e6,
        host_inclusive_us=host_s * 1e6,
        host_inclusive_calls=calls,
        useful_bytes=useful_bytes,
        achieved_GBps=achieved / 1e9,
        copy_bandwidth_GBps=copy["device_Bps"] / 1e9,
        copy_bandwidth_host_inclusive_GBps=copy["host_inclusive_Bps"] / 1e9,
        fraction_of_copy_bandwidth=achieved / copy["device_Bps"],
        floor_us=useful_bytes / copy["device_Bps"] * 1e6,
    )

"""What the benchmark suites share: the bench device, the tiny-run switch, the environment
stamped on every result, and device-aware timing.

On CUDA every timed callable ends with ``torch.cuda.synchronize()`` (:func:`synchronized`), so
pytest-benchmark's wall clock measures the device work, not the launch.

Settings, read here once for every suite:

* ``LFR_BENCH_TINY=1`` shrinks every suite to tiny sizes and single rounds: a check that the
  suites run (``scripts/gpu_check.sh --cpu-dry-run``), not a measurement;
* ``LFR_BENCH_K`` sets K, the number of ascent (and PGD) steps, in the suites that have one
  (``bench_step.py``, ``bench_penalty.py``, ``bench_scale_out.py``; tiny runs included): a quick
  look, since published figures use each setup's own K;
* ``LFR_BENCH_CPU_BATCH`` (default 16) is the batch of the CIFAR-size setups on a CPU.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import time

import torch

import lfr_ext

BENCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = os.environ.get("LFR_BENCH_TINY", "0") == "1"
CPU_BATCH = int(os.environ.get("LFR_BENCH_CPU_BATCH", 16))


def bench_k(default: int) -> int:
    """K for a setup whose own K is ``default``: ``LFR_BENCH_K`` when it is set."""
    return int(os.environ.get("LFR_BENCH_K", default))


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    triton = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton = triton.__version__
    return {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton,
        "lfr_ext": lfr_ext.__version__,
        "git_sha": _git_sha(),
        "compiled_library": lfr_ext._extension.is_loaded(),
        "tiny": TINY,
    }


def sync() -> None:
    if BENCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def host_inclusive_seconds_per_call(fn, calls: int, repeats: int = 5) -> float:
    """Wall time of ``calls`` back-to-back calls and one final sync, divided by ``calls``
    (median of ``repeats``): what a training loop pays per call, host overhead (Python,
    dispatch, launch) included. Device-side timers (CUDA events, ``do_bench``) hide it."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def device_seconds_per_call(fn, calls: int) -> float:
    """Device time per call: ``triton.testing.do_bench`` (CUDA events, L2 flushed, median) on a
    GPU with Triton, CUDA events around ``calls`` calls otherwise; on a CPU the host timing."""
    if BENCH_DEVICE != "cuda":
        return host_inclusive_seconds_per_call(fn, calls)
    if importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100 if TINY else 200, return_mode="median") / 1e3
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def synchronized(fn):
    """Wrap ``fn`` so that its timing includes the device work it queued."""
    if BENCH_DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run

"""Shared benchmark setup: environment stamps on every result, device-aware timing helpers.

Run ``pytest bench/ --benchmark-only`` (add ``--benchmark-json=bench/results/<gpu>-<date>.json``
to keep the numbers). On CUDA every timed callable ends with ``torch.cuda.synchronize()``,
so pytest-benchmark's wall clock measures the device work, not the launch.
"""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
import torch

import lfr_ext


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
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
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lfr_ext_environment"] = environment()


BENCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronized(fn):
    """Wrap ``fn`` so that its timing includes the device work it queued."""
    if BENCH_DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture
def device():
    return torch.device(BENCH_DEVICE)

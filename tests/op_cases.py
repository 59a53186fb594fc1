"""Shared cases of the op tests: which (impl, device) pairs run here, the input matrix, and
flash-attention's accuracy rule for reductions in low precision."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lfr_ext import _impl
from tests.utils import DEVICES, REQUIRE_COMPILED, REQUIRE_GPU

# CI sets LFR_EXT_REQUIRE_TRITON=1 (with TRITON_INTERPRET=1): then a missing Triton fails the
# Triton tests instead of skipping them.
REQUIRE_TRITON = os.environ.get("LFR_EXT_REQUIRE_TRITON", "0") == "1"
# The device each compiled implementation takes; the others run on every device.
_IMPL_DEVICE = {"cpu": "cpu", "cuda": "cuda"}

SHAPES = [
    (1, 1),  # a single sample of a single element
    (3, 7),  # prime
    (5, 1, 13, 11),  # odd, not a multiple of any vector width
    (2, 3, 17, 19),
    (4, 8, 16, 16),  # multiple of 16 elements per sample: the vectorised path
    (2, 3, 37, 41),  # 4551 per sample: several loop iterations per block
    (4, 0),  # empty samples: norm 0
    (0, 3, 5),  # B = 0
]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
QS = [1, 2, math.inf]


def _required(impl: str, device: str) -> bool:
    if device == "cuda":
        return REQUIRE_GPU  # every implementation must run on the GPU
    if impl == "cpu":
        return REQUIRE_COMPILED
    if impl == "triton":
        return REQUIRE_TRITON
    return False


def impl_device_cases(impls=("reference", "cpu", "cuda", "triton")):
    """pytest params (impl, device) for every device here (the C++ kernels only on the CPU, the
    CUDA kernels only on the GPU); unavailable ones are skipped with the reason, unless this run
    requires them (then the test fails)."""
    cases = []
    for device in DEVICES:
        for impl in impls:
            if _IMPL_DEVICE.get(impl, device) != device:
                continue
            reason = _impl.unavailable_reason(impl, torch.device(device))
            marks = [pytest.mark.skip(reason=reason)] if reason and not _required(impl, device) else []
            cases.append(pytest.param(impl, device, id=f"{impl}-{device}", marks=marks))
    return cases


def dtypes_for(impl: str) -> list[torch.dtype]:
    return LOW_PRECISION + ([] if impl == "triton" else [torch.float64])


def make_inputs(shape, dtype, device, contiguous=True):
    """x in [0,1], x_adv slightly outside it (box clip active), h and g signed with exact zeros."""

    def make(lo, hi, zero_every=0):
        t = lo + (hi - lo) * torch.rand(shape if contiguous else tuple(reversed(shape)), dtype=torch.float64)
        if zero_every and t.numel():
            t.view(-1)[::zero_every] = 0  # exact zeros: sign(0) = 0
        if not contiguous:  # same kind of values through a transposed (non-contiguous) layout
            t = t.permute(*reversed(range(len(shape))))
        return t.to(device=device, dtype=dtype)

    return make(0.0, 1.0), make(-0.1, 1.1), make(-1.0, 1.0, zero_every=5), make(-2.0, 2.0, zero_every=7)


def assert_reduction_accurate(got: torch.Tensor, same_dtype_torch: torch.Tensor, exact: torch.Tensor) -> None:
    """flash-attention's rule: max |got - exact| <= 2 max |torch - exact| + one ulp of the largest
    value, where ``exact`` is the fp64 reference and ``torch`` PyTorch's chain in got's dtype.

    The rule is judged on finite values only (inf - inf would pass vacuously): where the exact
    value overflows got's dtype, got must be +inf like PyTorch's; elsewhere both must be finite.
    NaN in ``exact`` (a NaN input) must be NaN in ``got``.
    """
    assert got.shape == exact.shape and got.dtype == same_dtype_torch.dtype
    if got.numel() == 0:
        return
    nan = exact.isnan()
    assert torch.equal(got.isnan(), nan), "NaN where the fp64 reference has none, or the reverse"
    overflows = ~nan & (exact.abs() > torch.finfo(got.dtype).max)
    assert torch.equal(got[overflows], same_dtype_torch[overflows]) and bool((got[overflows] == math.inf).all()), (
        "a norm beyond the dtype's range must be +inf, as PyTorch's"
    )
    finite = ~nan & ~overflows
    assert bool(got[finite].isfinite().all()), "inf where the exact norm fits the dtype"
    if not finite.any():
        return
    got, same_dtype_torch, exact = got[finite], same_dtype_torch[finite], exact[finite]
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=0)
        return
    ours = (got.double() - exact).abs().max()
    theirs = (same_dtype_torch.double() - exact).abs().max()
    assert theirs.isfinite(), "PyTorch's own same-dtype result is not finite: not a usable yardstick"
    ulp = torch.finfo(got.dtype).eps * exact.abs().max()
    assert ours <= 2 * theirs + ulp, f"error {ours:.3g} > 2 x PyTorch's {theirs:.3g} + {ulp:.3g}"

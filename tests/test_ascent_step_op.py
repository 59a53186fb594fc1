"""The compiled lfr_ext::ascent_step against the pure-PyTorch chain."""

import math

import pytest
import torch

import lfr_ext
from lfr_ext.reference import ascent_step_reference

from conftest import REQUIRE_COMPILED

compiled = pytest.mark.skipif(
    not lfr_ext._extension.is_loaded() and not REQUIRE_COMPILED, reason="compiled library not loaded"
)

SHAPES = [(1, 1), (3, 7), (5, 1, 13, 11), (2, 3, 17, 19), (4, 0), (0, 3, 5)]


def _inputs(shape, dtype, contiguous=True):
    """x in [0,1], x_adv slightly outside it (box clip active), h with exact zeros, g signed."""

    def make(lo, hi, zero_every=0):
        t = lo + (hi - lo) * torch.rand(tuple(reversed(shape)) if not contiguous else shape, dtype=torch.float64)
        if zero_every and t.numel():
            t.view(-1)[::zero_every] = 0  # exact zeros: sign(0) = 0
        if not contiguous:  # same kind of values through a transposed (non-contiguous) layout
            t = t.permute(*reversed(range(len(shape))))
        return t.to(dtype)

    return make(0.0, 1.0), make(-0.1, 1.1), make(-1.0, 1.0, zero_every=5), make(-2.0, 2.0, zero_every=7)


@compiled
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q", [1, 2, math.inf])
@pytest.mark.parametrize("contiguous", [True, False])
def test_cpu_kernel_matches_reference(shape, dtype, q, contiguous):
    x, x_adv, h, g = _inputs(shape, dtype, contiguous)
    args = dict(eps=0.03, step_size=0.007, lo=0.0, hi=1.0, q=q, return_sign_g=True)
    got = lfr_ext.ops.ascent_step(x, x_adv, h, g, impl="cpu", **args)
    expected = ascent_step_reference(x, x_adv, h, g, args["eps"], args["step_size"], 0.0, 1.0, q, True)
    # The update follows PyTorch's rounding step for step: bitwise equal.
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[2], expected[2])
    assert got[0].shape == x.shape and got[1].shape == (x.shape[0],) and got[1].dtype == dtype
    # The norm is a reduction; summation order differs, so judge it against fp64 (FA's rule).
    if dtype == torch.float64:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-13, atol=0)
        return
    exact = ascent_step_reference(x.double(), x_adv.double(), h.double(), g.double(), 0.03, 0.007, 0.0, 1.0, q)[1]
    torch_err = (expected[1].double() - exact).abs()
    ours_err = (got[1].double() - exact).abs()
    tiny = 4 * torch.finfo(dtype).eps * exact.abs()
    assert torch.all(ours_err <= 2 * torch_err + tiny)


@compiled
def test_sign_g_optional_and_nan_propagates():
    x, x_adv, h, g = _inputs((2, 5), torch.float32)
    x_adv[0, 1] = float("nan")
    out = lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01, impl="cpu")
    ref = ascent_step_reference(x, x_adv, h, g, 0.1, 0.01, 0.0, 1.0, 1)
    assert out[2].numel() == 0
    torch.testing.assert_close(out[0], ref[0], equal_nan=True, rtol=0, atol=0)


@compiled
def test_shape_and_dtype_errors():
    x, x_adv, h, g = _inputs((2, 5), torch.float32)
    with pytest.raises(RuntimeError, match="one shape"):
        lfr_ext.ops.ascent_step(x, x_adv[:1], h, g, eps=0.1, step_size=0.01, impl="cpu")
    with pytest.raises(RuntimeError, match="one dtype"):
        lfr_ext.ops.ascent_step(x, x_adv.double(), h, g, eps=0.1, step_size=0.01, impl="cpu")


@compiled
@pytest.mark.parametrize("return_sign_g", [True, False])
def test_opcheck(return_sign_g):
    for contiguous in (True, False):
        x, x_adv, h, g = _inputs((3, 2, 5), torch.float32, contiguous)
        torch.library.opcheck(torch.ops.lfr_ext.ascent_step.default,
                              (x, x_adv, h, g, 0.1, 0.01, 0.0, 1.0, 1, return_sign_g))


@compiled
def test_torch_compile_fullgraph_parity():
    x, x_adv, h, g = _inputs((4, 3, 5), torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, x_adv, h, g):
        return torch.ops.lfr_ext.ascent_step(x, x_adv, h, g, 0.1, 0.01, 0.0, 1.0, 1, True)

    for got, expected in zip(step(x, x_adv, h, g), lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01,
                                                                          return_sign_g=True, impl="cpu")):
        assert torch.equal(got, expected)

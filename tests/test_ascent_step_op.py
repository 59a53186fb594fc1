"""lfr_ext::ascent_step (C++ CPU, CUDA) and lfr_ext::ascent_step_triton against the eager chain.

Every implementation is run on every device here: the update and sign(g) must be bitwise
equal to PyTorch's chain on the same device (the kernels round as it does); the norm, a
reduction, is judged by flash-attention's rule against fp64.
"""

import math

import pytest
import torch

import lfr_ext
from lfr_ext.ops import q_code
from lfr_ext.reference import ascent_step_reference
from tests.op_cases import (
    QS,
    SHAPES,
    assert_reduction_accurate,
    dtypes_for,
    impl_device_cases,
    make_inputs,
)

ARGS = dict(eps=0.03, step_size=0.007, lo=0.0, hi=1.0)


def _reference(x, x_adv, h, g, q, return_sign_g=True):
    return ascent_step_reference(x, x_adv, h, g, ARGS["eps"], ARGS["step_size"], 0.0, 1.0, q, return_sign_g)


@pytest.mark.parametrize("impl, device", impl_device_cases())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(impl, device, shape, q, contiguous):
    for dtype in dtypes_for(impl):
        x, x_adv, h, g = make_inputs(shape, dtype, device, contiguous)
        got = lfr_ext.ops.ascent_step(x, x_adv, h, g, q=q, return_sign_g=True, impl=impl, **ARGS)
        expected = _reference(x, x_adv, h, g, q)
        assert got[0].shape == x.shape and got[1].shape == (x.shape[0],) and got[2].shape == x.shape
        assert all(t.dtype == dtype and t.device == x.device for t in got)
        assert torch.equal(got[0], expected[0]), f"{dtype}: update differs from the eager chain"
        assert torch.equal(got[2], expected[2]), f"{dtype}: sign(g) differs"
        exact = _reference(*(t.double() for t in (x, x_adv, h, g)), q)[1]
        assert_reduction_accurate(got[1], expected[1], exact)


@pytest.mark.parametrize("impl, device", impl_device_cases())
def test_sign_g_optional_nan_and_zero_conventions(impl, device):
    x, x_adv, h, g = make_inputs((3, 5), torch.float32, device)
    x_adv[0, 1] = float("nan")  # propagates into x_new
    h[1, 2] = float("nan")  # sign(NaN) = 0: no step there
    h[2, :] = 0.0  # sign(0) = 0
    g[1, 3] = float("nan")  # the norm of sample 1 is NaN, its sign 0
    g[2, :] = 0.0
    for q in QS:
        got = lfr_ext.ops.ascent_step(x, x_adv, h, g, q=q, impl=impl, **ARGS)
        assert got[2].numel() == 0
        expected = _reference(x, x_adv, h, g, q, return_sign_g=False)
        torch.testing.assert_close(got[0], expected[0], equal_nan=True, rtol=0, atol=0)
        assert torch.isnan(got[1][1]) and got[1][2] == 0 and torch.isfinite(got[1][0])
        got_sign = lfr_ext.ops.ascent_step(x, x_adv, h, g, q=q, return_sign_g=True, impl=impl, **ARGS)[2]
        assert got_sign[1, 3] == 0 and torch.equal(got_sign[2], torch.zeros_like(g[2]))
        assert torch.equal(got_sign, torch.sign(g))


@pytest.mark.parametrize("impl, device", impl_device_cases(("cpu", "cuda", "triton")))
def test_shape_dtype_and_q_errors(impl, device):
    x, x_adv, h, g = make_inputs((2, 5), torch.float32, device)
    with pytest.raises((RuntimeError, ValueError), match="one shape"):
        lfr_ext.ops.ascent_step(x, x_adv[:1], h, g, eps=0.1, step_size=0.01, impl=impl)
    with pytest.raises((RuntimeError, ValueError), match="one dtype"):
        lfr_ext.ops.ascent_step(x, x_adv.half(), h, g, eps=0.1, step_size=0.01, impl=impl)
    with pytest.raises((RuntimeError, ValueError), match="q must be"):
        lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01, q=3, impl=impl)


def _op_for(impl):
    return torch.ops.lfr_ext.ascent_step_triton.default if impl == "triton" else torch.ops.lfr_ext.ascent_step.default


@pytest.mark.parametrize("impl, device", impl_device_cases(("cpu", "cuda", "triton")))
@pytest.mark.parametrize("return_sign_g", [True, False])
def test_opcheck(impl, device, return_sign_g):
    for contiguous in (True, False):
        x, x_adv, h, g = make_inputs((3, 2, 5), torch.float32, device, contiguous)
        torch.library.opcheck(_op_for(impl), (x, x_adv, h, g, 0.1, 0.01, 0.0, 1.0, 1, return_sign_g))


@pytest.mark.parametrize("impl, device", impl_device_cases(("cpu", "cuda", "triton")))
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_parity(impl, device, backend):
    x, x_adv, h, g = make_inputs((4, 3, 5), torch.float32, device)
    op = _op_for(impl)

    @torch.compile(fullgraph=True, backend=backend)
    def step(x, x_adv, h, g):
        x_new, g_norm, sign_g = op(x, x_adv, h, g, 0.1, 0.01, 0.0, 1.0, q_code(2), True)
        return x_new * 2, g_norm.sum(), sign_g  # ops around it, so the backend has work to do

    got = step(x, x_adv, h, g)
    eager = lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01, q=2, return_sign_g=True, impl=impl)
    assert torch.equal(got[0], eager[0] * 2) and torch.equal(got[2], eager[2])
    torch.testing.assert_close(got[1], eager[1].sum())


@pytest.mark.slow
def test_cpu_kernel_past_2_pow_31_elements():
    """int64 offsets in the fused CPU step: 5 tensors of 2 x (2^30 + 3) bf16 elements (21.5 GB).
    (grad_norm's > 2^31 case needs only 6.4 GB: test_grad_norm_op.py; GPUs: test_cuda_ops.py.)"""
    import os

    if os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") < 48 * 2**30:
        pytest.skip("needs 48 GB of RAM")
    lfr_ext.ops.resolve_impl("cpu", torch.device("cpu"))
    shape = (2, 2**30 + 3)
    x = torch.full(shape, 0.5, dtype=torch.bfloat16)
    x_adv, h, g = x.clone(), torch.ones_like(x), torch.ones_like(x)
    h[1, -1], g[1, -1] = -1.0, 9.0
    x_new, g_norm, _ = lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.25, step_size=0.125, q=math.inf, impl="cpu")
    assert x_new[1, -1].item() == 0.375 and x_new[1, -2].item() == 0.625 and x_new[0, 0].item() == 0.625
    assert g_norm.tolist() == [1.0, 9.0]

"""lfr_ext::grad_norm (C++ CPU, CUDA) and lfr_ext::grad_norm_triton: values, autograd (first
and second order), subgradient conventions, opcheck and torch.compile."""

import math

import pytest
import torch

import lfr_ext
from lfr_ext.ops import grad_norm_backward, q_code
from lfr_ext.reference import grad_norm_reference
from tests.op_cases import QS, SHAPES, assert_reduction_accurate, dtypes_for, impl_device_cases, make_inputs


def _g(shape, dtype, device, contiguous=True):
    return make_inputs(shape, dtype, device, contiguous)[3]


@pytest.mark.parametrize("impl, device", impl_device_cases())
@pytest.mark.parametrize("shape", SHAPES + [(6,)])
@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(impl, device, shape, q, contiguous):
    for dtype in dtypes_for(impl):
        g = _g(shape, dtype, device, contiguous)
        got = lfr_ext.ops.grad_norm(g, q, impl=impl)
        assert got.shape == (shape[0],) and got.dtype == dtype and got.device == g.device
        assert_reduction_accurate(got, grad_norm_reference(g, q), grad_norm_reference(g.double(), q))


@pytest.mark.parametrize("impl, device", impl_device_cases(("cpu", "cuda", "triton")))
def test_same_norms_as_ascent_step(impl, device):
    """Both ops share one reduction per backend, so the norms they report are bitwise equal."""
    x, x_adv, h, g = make_inputs((5, 3, 9, 7), torch.float32, device)
    for q in QS:
        from_step = lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.1, step_size=0.01, q=q, impl=impl)[1]
        assert torch.equal(lfr_ext.ops.grad_norm(g, q, impl=impl), from_step)


@pytest.mark.parametrize("impl, device", impl_device_cases())
def test_fp16_norm_beyond_the_range_is_inf_like_pytorch(impl, device):
    """Sample 0's q=1 norm (80000) overflows fp16, sample 1's (10000) fits: inf where PyTorch
    gives inf, and the accuracy rule on the finite one."""
    g = torch.full((2, 40000), 2.0, dtype=torch.float16, device=device)
    g[1] /= 8
    got = lfr_ext.ops.grad_norm(g, 1, impl=impl)
    assert got[0] == math.inf and torch.isfinite(got[1])
    assert_reduction_accurate(got, grad_norm_reference(g, 1), grad_norm_reference(g.double(), 1))


def test_accuracy_rule_is_not_vacuous_at_inf():
    """inf against a finite exact norm fails, even where PyTorch's own result is inf too."""
    exact = torch.tensor([1.0, 60000.0], dtype=torch.float64)
    inf_both = torch.tensor([1.0, math.inf], dtype=torch.float16)
    with pytest.raises(AssertionError, match="inf where the exact norm fits"):
        assert_reduction_accurate(inf_both, inf_both, exact)
    finite = torch.tensor([1.0, 60000.0], dtype=torch.float16)
    with pytest.raises(AssertionError, match="must be \\+inf"):
        assert_reduction_accurate(finite, finite, torch.tensor([1.0, 1e6], dtype=torch.float64))


@pytest.mark.parametrize("impl, device", impl_device_cases(("cpu", "cuda", "triton")))
def test_nan_propagates(impl, device):
    g = _g((3, 11), torch.float32, device)
    g[1, 4] = float("nan")
    for q in QS:
        got = lfr_ext.ops.grad_norm(g, q, impl=impl)
        assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all(), q


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------
def _smooth_g(shape, device, dtype=torch.float64):
    """Away from the kinks: no zeros (q=1), one clear maximum per sample (q=inf)."""
    g = (torch.rand(shape, dtype=torch.float64) + 0.2) * torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    g.view(shape[0], -1)[:, 0] = 3.0
    return g.to(device=device, dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("impl, device", impl_device_cases(("reference", "cpu", "cuda")))  # the fp64 ones
@pytest.mark.parametrize("q", QS)
def test_gradcheck_and_gradgradcheck(impl, device, q):
    g = _smooth_g((3, 2, 4), device)
    fn = lambda t: lfr_ext.ops.grad_norm(t, q, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (g,))
    assert torch.autograd.gradgradcheck(fn, (g,))


@pytest.mark.parametrize("impl, device", impl_device_cases())
@pytest.mark.parametrize("q", QS)
def test_first_and_second_derivatives_match_reference(impl, device, q):
    """Also for the Triton op (no fp64, so no gradcheck): d n / d g and d/d g of <d n/d g, v>."""
    g = _smooth_g((4, 3, 5), device, torch.float32)
    w = torch.rand(4, device=device)
    v = torch.randn(4, 3, 5, device=device)

    def derivatives(which):
        n = lfr_ext.ops.grad_norm(g, q, impl=which)
        (dg,) = torch.autograd.grad((n * w).sum(), g, create_graph=True)
        (ddg,) = torch.autograd.grad((dg * v).sum(), g, allow_unused=True)
        return dg.detach(), torch.zeros_like(g) if ddg is None else ddg

    for got, expected in zip(derivatives(impl), derivatives("reference")):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("impl, device", impl_device_cases())
def test_subgradient_conventions_equal_reference(impl, device):
    """Zeros (q=1), an all-zero sample (q=2, q=inf) and tied maxima (q=inf, shared evenly)."""
    g = torch.tensor(
        [[0.0, 1.5, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 2.0, 1.0, -2.0], [0.5, -0.25, 0.0, 0.125]],
        device=device,
    ).requires_grad_(True)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    for q in QS:
        (got,) = torch.autograd.grad((lfr_ext.ops.grad_norm(g, q, impl=impl) * w).sum(), g)
        (expected,) = torch.autograd.grad((grad_norm_reference(g, q) * w).sum(), g)
        assert torch.equal(got, expected), q
    # the conventions themselves, spelled out
    (tie,) = torch.autograd.grad(lfr_ext.ops.grad_norm(g, math.inf, impl=impl)[2], g)
    assert torch.equal(tie[2], torch.tensor([-1 / 3, 1 / 3, 0.0, -1 / 3], device=device))
    (zero,) = torch.autograd.grad(lfr_ext.ops.grad_norm(g, 2, impl=impl)[1], g)
    assert torch.equal(zero[1], torch.zeros(4, device=device))


def test_backward_formula_is_differentiable_in_grad_out_and_g():
    """grad_norm_backward itself, through plain autograd (what create_graph relies on)."""
    g = _smooth_g((2, 5), "cpu")
    grad_out = torch.rand(2, dtype=torch.float64, requires_grad=True)
    for q in (1, 2, math.inf):

        def backward(go, t, q=q):
            return grad_norm_backward(t, grad_norm_reference(t, q), go, q_code(q))

        assert torch.autograd.gradcheck(backward, (grad_out, g))


@pytest.mark.parametrize("impl, device", impl_device_cases(("cpu", "cuda", "triton")))
def test_opcheck(impl, device):
    op = torch.ops.lfr_ext.grad_norm_triton.default if impl == "triton" else torch.ops.lfr_ext.grad_norm.default
    for contiguous in (True, False):
        for requires_grad in (False, True):
            g = _g((3, 2, 5), torch.float32, device, contiguous).detach().requires_grad_(requires_grad)
            for q in (1, 2, -1):
                torch.library.opcheck(op, (g, q))


@pytest.mark.parametrize("impl, device", impl_device_cases(("cpu", "cuda", "triton")))
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_parity_with_backward(impl, device, backend):
    g = _smooth_g((4, 3, 5), device, torch.float32)

    def loss(t):
        return (lfr_ext.ops.grad_norm(t, 2, impl=impl) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    (got,) = torch.autograd.grad(compiled(g), g)
    (expected,) = torch.autograd.grad(loss(g), g)
    torch.testing.assert_close(compiled(g), loss(g))
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("impl, device", impl_device_cases(("cpu", "cuda")))
def test_more_than_2_pow_31_elements(impl, device):
    """int64 offsets: sample 2 starts past element 2^31 (bf16, 6.4 GB)."""
    per_sample = 2**30 + 1
    g = torch.ones(3, per_sample, dtype=torch.bfloat16, device=device)
    g[2, -1] = 7.0  # the last element, at offset 3 * 2^30 + 2 > 2^31
    g[1, 0] = -5.0
    norms_inf = lfr_ext.ops.grad_norm(g, math.inf, impl=impl)
    assert norms_inf.tolist() == [1.0, 5.0, 7.0]
    norms_1 = lfr_ext.ops.grad_norm(g, 1, impl=impl).double()
    exact = torch.tensor([per_sample, per_sample + 4, per_sample + 6], dtype=torch.float64, device=device)
    torch.testing.assert_close(norms_1, exact, rtol=1e-2, atol=0)  # bf16 output: 8 bits of mantissa

"""Triton-specific checks of lfr_ext::{ascent_step,grad_norm}_triton: the split launch (several
programs per sample), the launch plan, the registration, and the bf16 rounding helper.

In CI these run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1); on a GPU
machine on CUDA tensors. The value/autograd/opcheck/compile matrix of the Triton ops lives in
test_ascent_step_op.py and test_grad_norm_op.py with the other implementations.
"""

import math

import pytest
import torch

import lfr_ext
from lfr_ext import _registry
from lfr_ext.reference import ascent_step_reference, grad_norm_reference, q_code

from op_cases import LOW_PRECISION, QS, REQUIRE_TRITON, assert_reduction_accurate, make_inputs

TRITON_DEVICES = [d for d in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
                  if _registry.unavailable_reason("triton", torch.device(d)) is None]
if not TRITON_DEVICES and not REQUIRE_TRITON:
    pytest.skip(f"Triton kernels unavailable: {_registry.unavailable_reason('triton', torch.device('cpu'))}",
                allow_module_level=True)
DEVICE = TRITON_DEVICES[0] if TRITON_DEVICES else "cpu"

import triton  # noqa: E402  (after the skip: importable from here on)
import triton.language as tl  # noqa: E402

from lfr_ext.kernels.common import round_to_storage  # noqa: E402


@triton.jit
def _round_kernel(SRC, DST, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(DST + idx, round_to_storage(tl.load(SRC + idx, mask=mask), tl.bfloat16), mask=mask)


def _kernels():
    kernels = _registry.triton_kernels()
    assert not isinstance(kernels, str), kernels
    return kernels


def _identity_launch(kernel):
    return kernel


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("chunks", [2, 3])
def test_split_launch_matches_reference(dtype, q, chunks):
    """Programs sharing a sample write fp32 partials that are folded afterwards."""
    from lfr_ext.kernels.ascent_step import ascent_step_fwd
    from lfr_ext.kernels.grad_norm import grad_norm_fwd

    _kernels()
    x, x_adv, h, g = make_inputs((3, 5000), dtype, DEVICE)  # 5000 = 2 blocks of 2048 + a partial one
    got = ascent_step_fwd(x, x_adv, h, g, 0.03, 0.007, 0.0, 1.0, q_code(q), True, _identity_launch, chunks=chunks)
    expected = ascent_step_reference(x, x_adv, h, g, 0.03, 0.007, 0.0, 1.0, q, True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    exact = grad_norm_reference(g.double(), q)
    assert_reduction_accurate(got[1], expected[1], exact)
    norms = grad_norm_fwd(g, q_code(q), _identity_launch, chunks=chunks)
    assert_reduction_accurate(norms, expected[1], exact)


def test_launch_plan():
    from lfr_ext.kernels.launch import plan_launch

    cuda = torch.device("cuda")
    small = plan_launch(128, 784, torch.device("cpu"))
    assert (small.block, small.chunks, small.chunk_len) == (1024, 1, 784)
    forced = plan_launch(2, 5000, torch.device("cpu"), chunks=3)
    assert forced.chunks * forced.chunk_len >= 5000 and forced.chunk_len % forced.block == 0
    assert (forced.chunks - 1) * forced.chunk_len < 5000  # no empty chunk
    assert plan_launch(4, 0, torch.device("cpu")).chunks == 1
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert plan_launch(sms, 150528, cuda).chunks == 1  # the batch fills the GPU: one launch
        assert plan_launch(1, 150528, cuda).chunks > 1


def test_registration_kind():
    """A triton_op (kernels visible to Inductor) on GPU; an opaque custom_op under the interpreter."""
    kernels = _kernels()
    try:  # a private registry of torch (2.7+): triton_op records the kernels it launches, for Inductor
        from torch._library.triton import triton_ops_to_kernels
    except ImportError:
        triton_ops_to_kernels = None

    for name in ("lfr_ext::ascent_step_triton", "lfr_ext::grad_norm_triton"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd") or \
            torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        if triton_ops_to_kernels is not None:
            assert (name in triton_ops_to_kernels) == (not kernels.INTERPRETED)


def test_bf16_rounding_is_round_to_nearest_even():
    """The integer-arithmetic rounding of common.round_to_storage equals PyTorch's fp32 -> bf16,
    ties, overflow to inf, NaN and denormals included (the interpreter alone would truncate)."""
    _kernels()
    ties = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.3895e38, 1e-40, -0.0, float("inf")])
    src = torch.cat([ties, torch.randn(4093) * 10.0 ** torch.randint(-30, 30, (4093,))]).to(DEVICE)
    dst = torch.empty(src.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(triton.cdiv(src.numel(), 1024),)](src, dst, src.numel(), BLOCK=1024)
    assert torch.equal(dst, src.to(torch.bfloat16))
    nan = torch.full((4,), float("nan"), device=DEVICE)
    _round_kernel[(1,)](nan, dst, 4, BLOCK=1024)
    assert torch.isnan(dst[:4]).all()


@pytest.mark.parametrize("q", QS)
def test_bf16_subnormals(q):
    """Inputs below bf16's normal range round-trip exactly (widening is a bit shift)."""
    x, x_adv, h, g = make_inputs((2, 64), torch.bfloat16, DEVICE)
    tiny = torch.tensor([1e-40, -2.3e-39, 9e-39, 5e-41], dtype=torch.bfloat16, device=DEVICE)
    x_adv[0, :4], h[0, :4], g[0, :4], g[1, :] = tiny, tiny, tiny, tiny.repeat(16)
    got = lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.03, step_size=1e-39, q=q, return_sign_g=True, impl="triton")
    expected = ascent_step_reference(x, x_adv, h, g, 0.03, 1e-39, 0.0, 1.0, q, True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert_reduction_accurate(got[1], expected[1], grad_norm_reference(g.double(), q))


@pytest.mark.parametrize("q", QS)
def test_fp64_is_refused_clearly(q):
    g = torch.ones(2, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="takes"):
        torch.ops.lfr_ext.grad_norm_triton(g, q_code(q))
    assert lfr_ext.ops.resolve_impl("auto", torch.device(DEVICE), torch.float64) != "triton"
    assert math.isfinite(float(lfr_ext.ops.grad_norm(g, q)[0]))

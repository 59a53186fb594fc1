"""GPU-only checks of the compiled CUDA kernels and the Triton kernels on CUDA tensors:
CUDA-graph capture and replay (which also proves the kernels run on the current stream and
never synchronise), a side stream, samples split over several blocks, reduce-overhead
compile, and more than 2^31 elements. Skipped without a GPU."""

import math

import pytest
import torch

import lfr_ext
from lfr_ext import _impl
from lfr_ext.reference import ascent_step_reference, grad_norm_reference
from tests.op_cases import LOW_PRECISION, QS, assert_reduction_accurate, make_inputs
from tests.utils import CUDA_MARKS, HAS_CUDA, REQUIRE_GPU

pytestmark = CUDA_MARKS


def gpu_impls():
    """The GPU implementations, each skipped with its reason when unavailable (a failure under
    LFR_EXT_REQUIRE_GPU=1, see conftest.py)."""
    if not HAS_CUDA:
        return []
    cases = []
    for impl in ("cuda", "triton"):
        reason = _impl.unavailable_reason(impl, torch.device("cuda"))
        cases.append(pytest.param(impl, marks=[pytest.mark.skip(reason=reason)] if reason and not REQUIRE_GPU else []))
    return cases


ARGS = dict(eps=0.03, step_size=0.007, lo=0.0, hi=1.0)


@pytest.mark.parametrize("impl", gpu_impls())
@pytest.mark.parametrize("shape", [(1, 100003), (3, 65536), (2, 3, 224, 224), (257, 3, 32, 32)])
@pytest.mark.parametrize("q", QS)
def test_large_samples_and_batches(impl, shape, q):
    """Few large samples: several blocks per sample and a fold; many samples: one launch."""
    for dtype in LOW_PRECISION:
        x, x_adv, h, g = make_inputs(shape, dtype, "cuda")
        if dtype == torch.float16:
            g = g / 8  # |g| <= 1/4: the q=1 norm of 100003 entries fits fp16 (max 65504), so accuracy is judged
        got = lfr_ext.ops.ascent_step(x, x_adv, h, g, q=q, return_sign_g=True, impl=impl, **ARGS)
        expected = ascent_step_reference(x, x_adv, h, g, 0.03, 0.007, 0.0, 1.0, q, True)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
        exact = grad_norm_reference(g.double(), q)
        assert_reduction_accurate(got[1], expected[1], exact)
        assert_reduction_accurate(lfr_ext.ops.grad_norm(g, q, impl=impl), expected[1], exact)


@pytest.mark.parametrize("impl", gpu_impls())
@pytest.mark.parametrize("shape", [(128, 1, 28, 28), (2, 3, 224, 224)])
def test_cuda_graph_capture_and_replay(impl, shape):
    x, x_adv, h, g = make_inputs(shape, torch.float32, "cuda")
    static = [t.clone() for t in (x, x_adv, h, g)]

    def step():
        out = lfr_ext.ops.ascent_step(*static, q=1, return_sign_g=True, impl=impl, **ARGS)
        return out + (lfr_ext.ops.grad_norm(static[3], 2, impl=impl),)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles here), as the CUDA-graph docs advise
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):  # new data through the same buffers, then replay
        fresh = make_inputs(shape, torch.float32, "cuda")
        for buf, new in zip(static, fresh):
            buf.copy_(new)
        graph.replay()
        eager = step()
        for got, expected in zip(captured, eager):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("impl", gpu_impls())
def test_runs_on_the_current_stream(impl):
    x, x_adv, h, g = make_inputs((64, 3, 32, 32), torch.float32, "cuda")
    expected = lfr_ext.ops.ascent_step(x, x_adv, h, g, q=2, impl=impl, **ARGS)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = lfr_ext.ops.ascent_step(x, x_adv, h, g, q=2, impl=impl, **ARGS)
        norms = lfr_ext.ops.grad_norm(g, 2, impl=impl)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(norms, expected[1])


@pytest.mark.parametrize("impl", gpu_impls())
def test_compile_reduce_overhead_parity(impl):
    x, x_adv, h, g = make_inputs((32, 3, 32, 32), torch.float32, "cuda")

    def step(x, x_adv, h, g):
        x_new, g_norm, _ = lfr_ext.ops.ascent_step(x, x_adv, h, g, q=1, impl=impl, **ARGS)
        return x_new, g_norm + lfr_ext.ops.grad_norm(g, math.inf, impl=impl)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        got = compiled(x, x_adv, h, g)
        expected = step(x, x_adv, h, g)
        assert torch.equal(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])


@pytest.mark.slow
@pytest.mark.parametrize("impl", gpu_impls())
def test_ascent_step_past_2_pow_31_elements(impl):
    """int64 offsets in the fused step: 2 x (2^30 + 3) bf16 elements per tensor (5 tensors, 21.5 GB)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    shape = (2, 2**30 + 3)
    x = torch.full(shape, 0.5, dtype=torch.bfloat16, device="cuda")
    x_adv = x.clone()
    h = torch.ones_like(x)
    h[1, -1] = -1.0  # the very last element steps down
    g = torch.ones_like(x)
    g[1, -1] = 9.0
    x_new, g_norm, _ = lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.25, step_size=0.125, q=math.inf, impl=impl)
    assert x_new[1, -1].item() == 0.375 and x_new[1, -2].item() == 0.625 and x_new[0, 0].item() == 0.625
    assert g_norm.tolist() == [1.0, 9.0]

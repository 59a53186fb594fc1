"""Triton-specific checks of lfr_ext::{ascent_step,grad_norm}_triton: the split launch (several
programs per sample), the launch plan, the registration, and the bf16 rounding helper.

In CI these run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1); on a GPU
machine on CUDA tensors. The value/autograd/opcheck/compile matrix of the Triton ops lives in
test_ascent_step_op.py and test_grad_norm_op.py with the other implementations.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import lfr_ext
from lfr_ext import _impl
from lfr_ext.ops import OPS, q_code
from lfr_ext.reference import ascent_step_reference, grad_norm_reference
from tests.op_cases import LOW_PRECISION, QS, REQUIRE_TRITON, assert_reduction_accurate, make_inputs
from tests.utils import HAS_CUDA, REQUIRE_GPU

TRITON_DEVICES = [
    d for d in (["cuda"] if HAS_CUDA else []) + ["cpu"] if _impl.unavailable_reason("triton", torch.device(d)) is None
]
if not TRITON_DEVICES and not (REQUIRE_TRITON or REQUIRE_GPU):
    pytest.skip(
        f"Triton kernels unavailable: {_impl.unavailable_reason('triton', torch.device('cpu'))}",
        allow_module_level=True,
    )
DEVICE = TRITON_DEVICES[0] if TRITON_DEVICES else ("cuda" if HAS_CUDA else "cpu")
if DEVICE == "cuda":
    pytestmark = pytest.mark.cuda  # on a GPU machine these run on CUDA tensors: GPU tests

import triton  # noqa: E402  (after the skip: importable from here on)
import triton.language as tl  # noqa: E402

from lfr_ext.kernels.common import round_to_storage  # noqa: E402


@triton.jit
def _round_kernel(SRC, DST, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(DST + idx, round_to_storage(tl.load(SRC + idx, mask=mask), tl.bfloat16), mask=mask)


def _kernels():
    kernels = _impl.triton_kernels()
    assert not isinstance(kernels, str), kernels
    return kernels


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("chunks", [2, 3])
def test_split_launch_matches_reference(dtype, q, chunks):
    """Programs sharing a sample write fp32 partials that are folded afterwards."""
    from lfr_ext.kernels.launch import forced_chunks

    _kernels()
    x, x_adv, h, g = make_inputs((3, 5000), dtype, DEVICE)  # 5000 = 2 blocks of 2048 + a partial one
    with forced_chunks(chunks):
        got = torch.ops.lfr_ext.ascent_step_triton(x, x_adv, h, g, 0.03, 0.007, 0.0, 1.0, q_code(q), True)
        norms = torch.ops.lfr_ext.grad_norm_triton(g, q_code(q))
    expected = ascent_step_reference(x, x_adv, h, g, 0.03, 0.007, 0.0, 1.0, q, True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    exact = grad_norm_reference(g.double(), q)
    assert_reduction_accurate(got[1], expected[1], exact)
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
    for spec in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            spec.triton, "CompositeExplicitAutograd"
        ) or torch._C._dispatch_has_kernel_for_dispatch_key(spec.triton, "CPU"), spec.triton


def test_triton_op_knows_its_kernels():
    """torch.library.triton_op finds an op's kernels by reading its source (the AOTAutograd cache
    keys on them, so an edited kernel invalidates compiled graphs). That needs the launch spelled
    ``wrap_triton(kernel)[grid]`` in the op body. Checked without the interpreter, where the ops
    are triton_ops, in a subprocess (the interpreter is chosen at import). No GPU is needed."""
    code = (
        "import torch\n"
        "try:\n"
        "    from torch._library.triton import get_triton_kernels_for_op\n"
        "except ImportError:\n"
        "    print('SKIP: this torch does not track the kernels of triton_ops'); raise SystemExit\n"
        "from lfr_ext.kernels import registration\n"
        "from lfr_ext.kernels.aot import op_matrices\n"
        "from lfr_ext.ops import OPS\n"
        "assert not registration.INTERPRETED\n"
        "for spec in OPS:\n"
        "    declared = [matrix.kernel for matrix in op_matrices(spec.name)]\n"
        "    found = get_triton_kernels_for_op(spec.triton)\n"
        "    assert found == declared, (spec.triton, found, declared)\n"
        "print('OK')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.strip().endswith("OK"), out.stdout


def test_device_guard_targets_the_tensors_device():
    """Triton launches on the current CUDA device: the launchers make the tensors' device
    current (checked here without a GPU: the guard object for cuda:1, never entered)."""
    import contextlib

    from lfr_ext.kernels.launch import device_guard

    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_on_the_second_gpu():
    x, x_adv, h, g = make_inputs((4, 3, 7, 5), torch.float32, "cuda:1")
    got = lfr_ext.ops.ascent_step(x, x_adv, h, g, eps=0.03, step_size=0.007, q=2, return_sign_g=True, impl="triton")
    expected = ascent_step_reference(x, x_adv, h, g, 0.03, 0.007, 0.0, 1.0, 2, True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert_reduction_accurate(got[1], expected[1], grad_norm_reference(g.double(), 2))
    assert_reduction_accurate(
        lfr_ext.ops.grad_norm(g, 2, impl="triton"), expected[1], grad_norm_reference(g.double(), 2)
    )


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

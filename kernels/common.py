"""``@triton.jit`` helpers shared by the lfr_ext Triton kernels.

They reproduce PyTorch's elementwise semantics inside a kernel: every intermediate is computed
in fp32 and rounded to the storage dtype, as PyTorch's own op chain does between ops;
``sign(NaN) = 0`` as in ``torch.sign``; max/min propagate NaN as ``torch.maximum``/``minimum``.
"""

import triton
import triton.language as tl

from .. import _op_specs

# The q code of the inf-norm (lfr_ext/_op_specs.py), as a constexpr: a @triton.jit function reads
# no other kind of global.
Q_INF: tl.constexpr = tl.constexpr(_op_specs.Q_INF)


@triton.jit
def round_to_storage(v, DTYPE: tl.constexpr):
    """Round fp32 ``v`` to ``DTYPE`` (to nearest, ties to even) and return it in ``DTYPE``.

    bf16 is rounded with integer arithmetic on the fp32 bits (as c10::BFloat16 does) because
    the Triton interpreter, which CI runs on CPU tensors, truncates fp32 -> bf16 instead of
    rounding; on a GPU the result is the same as ``cvt.rn.bf16.f32``, at the cost of a few
    integer ops in a memory-bound kernel.
    """
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)  # a quiet NaN (the carry could turn NaN into inf)
        # Reinterpret the top 16 bits instead of converting, which the interpreter also gets
        # wrong for subnormals.
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def to_fp32(v):
    """Widen ``v`` to fp32 exactly. bf16 is widened by a 16-bit shift of its bits (what the
    hardware conversion does) because the interpreter flushes bf16 subnormals wrongly."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def sign_of(v):
    """``torch.sign`` in fp32: ``(0 < v) - (v < 0)``, hence 0 for 0 and NaN."""
    return (v > 0).to(tl.float32) - (v < 0).to(tl.float32)


@triton.jit
def nan_maximum(a, b):
    """``torch.maximum``: NaN if either is NaN."""
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))


@triton.jit
def nan_minimum(a, b):
    """``torch.minimum``: NaN if either is NaN."""
    return tl.where((a != a) | (b != b), a + b, tl.minimum(a, b))


@triton.jit
def clamp_keep_nan(v, lo, hi):
    """``torch.clamp(v, lo, hi)`` with scalar bounds: NaN stays NaN, else ``min(max(v, lo), hi)``."""
    return tl.where(v != v, v, tl.minimum(tl.maximum(v, lo), hi))


@triton.jit
def accumulate_norm(acc, g, Q: tl.constexpr):
    """Fold a block of ``g`` (any float dtype, masked lanes 0) into the fp32 per-lane ``acc``:
    ``sum |g|`` (Q=1), ``sum g^2`` (Q=2) or ``max |g|`` (Q=Q_INF; NaN kept)."""
    a = tl.abs(to_fp32(g))
    if Q == 1:
        acc += a
    elif Q == 2:
        acc += a * a
    else:
        acc = nan_maximum(acc, a)
    return acc


@triton.jit
def reduce_norm(acc, Q: tl.constexpr):
    """Reduce the per-lane accumulator to one fp32 value (not yet square-rooted for Q=2)."""
    if Q == Q_INF:
        has_nan = tl.max((acc != acc).to(tl.int32), axis=0) > 0  # tl.max does not propagate NaN
        return tl.where(has_nan, float("nan"), tl.max(acc, axis=0))
    return tl.sum(acc, axis=0)


@triton.jit
def finish_norm(total, Q: tl.constexpr):
    """``sqrt`` for Q=2 (IEEE-rounded ``sqrt_rn``), identity otherwise."""
    if Q == 2:
        return tl.sqrt_rn(total)
    return total

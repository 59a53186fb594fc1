r"""Triton kernel of ``lfr_ext::ascent_step_triton``: the LFR ascent update and the per-sample
norm of ``g`` in one pass over memory.

.. math::
   x_{new} = \mathrm{clamp}_{[lo,hi]}\big(\min(\max(x' + \alpha\,\mathrm{sign}(h),\ x-\epsilon),\ x+\epsilon)\big),
   \qquad n_b = \|g_b\|_q,\qquad s = \mathrm{sign}(g).

All of x, x', h, g are (B, ...) of one shape and dtype (fp32, bf16, fp16); ``n`` is (B,). Each
intermediate is computed in fp32 and rounded to the storage dtype, as the eager PyTorch chain
(:func:`lfr_ext.reference.ascent_step_reference`) rounds between its ops. The Python scalars
follow the chain of the tensors' device: PyTorch's CUDA ops keep ``eps`` and ``step_size`` in
fp32, its CPU ops round them to the storage dtype first (``ROUND_SCALARS``); ``clamp`` rounds
``lo``/``hi`` to the storage dtype on both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .aot import STORAGE, AotMatrix
from .common import (
    accumulate_norm,
    clamp_keep_nan,
    finish_norm,
    nan_maximum,
    nan_minimum,
    reduce_norm,
    round_to_storage,
    sign_of,
    to_fp32,
)
from .launch import (
    INTERPRETED,
    MAX_BLOCK,
    SUPPORTED_DTYPES,
    check_dtype_and_q,
    device_guard,
    fold_partial_norms,
    plan_launch,
)


@triton.jit
def _ascent_step_fwd_kernel(
    X,
    X_ADV,
    H,
    G,  # (B, per_sample) dense inputs
    X_NEW,  # (B, per_sample) output
    SIGN_G,  # (B, per_sample) output when WRITE_SIGN
    G_NORM,  # (B,) output when not SPLIT
    PARTIAL,  # (B, C) fp32 partial norms when SPLIT
    per_sample,
    chunk_len,
    eps,
    step_size,
    lo,
    hi,
    Q: tl.constexpr,
    WRITE_SIGN: tl.constexpr,
    ROUND_SCALARS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DTYPE: tl.constexpr = X.dtype.element_ty
    sample = tl.program_id(0).to(tl.int64)  # int64: B * per_sample may exceed 2^31
    chunk = tl.program_id(1).to(tl.int64)
    start = chunk * chunk_len
    stop = tl.minimum(start + chunk_len, per_sample)
    base = sample * per_sample

    # fp32 scalar tensors (the interpreter passes Python floats).
    eps = tl.full([], eps, tl.float32)
    step_size = tl.full([], step_size, tl.float32)
    if ROUND_SCALARS:  # PyTorch's CPU ops round a Python scalar to the storage dtype
        eps = round_to_storage(eps, DTYPE).to(tl.float32)
        step_size = round_to_storage(step_size, DTYPE).to(tl.float32)
    lo = round_to_storage(tl.full([], lo, tl.float32), DTYPE).to(tl.float32)  # clamp converts lo, hi
    hi = round_to_storage(tl.full([], hi, tl.float32), DTYPE).to(tl.float32)  # to the dtype

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(start, stop, BLOCK):
        idx = base + offset + tl.arange(0, BLOCK)
        mask = offset + tl.arange(0, BLOCK) < stop
        x = to_fp32(tl.load(X + idx, mask=mask, other=0.0))
        x_adv = to_fp32(tl.load(X_ADV + idx, mask=mask, other=0.0))
        h = to_fp32(tl.load(H + idx, mask=mask, other=0.0))
        g = tl.load(G + idx, mask=mask, other=0.0)

        # x_adv + step_size * sign(h): two ops, each rounded to the storage dtype.
        step_term = round_to_storage(step_size * sign_of(h), DTYPE).to(tl.float32)
        moved = round_to_storage(x_adv + step_term, DTYPE).to(tl.float32)
        # min(max(moved, x - eps), x + eps): projection onto the eps-ball around x.
        lower = round_to_storage(x - eps, DTYPE).to(tl.float32)
        upper = round_to_storage(x + eps, DTYPE).to(tl.float32)
        projected = nan_minimum(nan_maximum(moved, lower), upper)
        # clamp to the box (exact: every operand is already representable in DTYPE).
        x_new = clamp_keep_nan(projected, lo, hi)
        tl.store(X_NEW + idx, round_to_storage(x_new, DTYPE), mask=mask)  # exact: x_new is representable

        acc = accumulate_norm(acc, g, Q)
        if WRITE_SIGN:
            tl.store(SIGN_G + idx, sign_of(to_fp32(g)).to(DTYPE), mask=mask)

    total = reduce_norm(acc, Q)
    if SPLIT:
        tl.store(PARTIAL + sample * tl.num_programs(1) + chunk, total)
    else:
        tl.store(G_NORM + sample, round_to_storage(finish_norm(total, Q), DTYPE))


# Compiled ahead of time (kernels/aot.py): every dtype and q at the largest block (8 warps); the
# two flag combinations give each of WRITE_SIGN, ROUND_SCALARS and SPLIT both values.
AOT = (
    AotMatrix(
        _ascent_step_fwd_kernel,
        dtypes=SUPPORTED_DTYPES,
        arg_types=dict(
            X=STORAGE,
            X_ADV=STORAGE,
            H=STORAGE,
            G=STORAGE,
            X_NEW=STORAGE,
            SIGN_G=STORAGE,
            G_NORM=STORAGE,
            PARTIAL="*fp32",
            per_sample="i64",
            chunk_len="i64",
            eps="fp32",
            step_size="fp32",
            lo="fp32",
            hi="fp32",
        ),
        flags=(
            dict(WRITE_SIGN=True, ROUND_SCALARS=False, SPLIT=False),
            dict(WRITE_SIGN=False, ROUND_SCALARS=True, SPLIT=True),
        ),
        block=MAX_BLOCK,
    ),
)


def check_ascent_step_args(x, x_adv, h, g, q) -> None:
    if x.dim() < 1:
        raise ValueError("ascent_step: x must have a batch dimension, got a 0-dim tensor")
    if not (x.shape == x_adv.shape == h.shape == g.shape):
        raise ValueError(
            f"ascent_step: x, x_adv, h and g must have one shape, got {tuple(x.shape)}, {tuple(x_adv.shape)}, "
            f"{tuple(h.shape)}, {tuple(g.shape)}"
        )
    if not (x.dtype == x_adv.dtype == h.dtype == g.dtype):
        raise ValueError("ascent_step: x, x_adv, h and g must have one dtype")
    check_dtype_and_q("ascent_step", x.dtype, q)


def ascent_step_triton(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    step_size: float,
    lo: float,
    hi: float,
    q: int,
    return_sign_g: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op ``lfr_ext::ascent_step_triton``: ``(x_new (B, ...), g_norm (B,), sign_g (B, ...)
    or (0,))``; q is 1, 2 or -1 (inf).

    The launch is written ``wrap_triton(kernel)[grid](...)`` in this body on purpose:
    ``torch.library.triton_op`` finds the kernels of an op by reading its source, and the
    AOTAutograd cache keys on them, so an edited kernel invalidates compiled graphs.
    """
    check_ascent_step_args(x, x_adv, h, g, q)
    x, x_adv, h, g = x.contiguous(), x_adv.contiguous(), h.contiguous(), g.contiguous()
    batch = x.shape[0]
    per_sample = x.numel() // batch if batch else 0
    x_new = torch.empty_like(x)
    g_norm = x.new_empty(batch)
    sign_g = torch.empty_like(x) if return_sign_g else x.new_empty(0)
    if batch == 0:
        return x_new, g_norm, sign_g
    plan = plan_launch(batch, per_sample, x.device)
    split = plan.chunks > 1
    partial = x.new_empty((batch, plan.chunks), dtype=torch.float32) if split else x.new_empty(1, dtype=torch.float32)
    # Unused outputs get a one-element dummy, never an alias of another argument.
    sign_out = sign_g if return_sign_g else x.new_empty(1)
    kernel = _ascent_step_fwd_kernel if INTERPRETED else wrap_triton(_ascent_step_fwd_kernel)
    with device_guard(x.device):
        kernel[(batch, plan.chunks)](
            x,
            x_adv,
            h,
            g,
            x_new,
            sign_out,
            g_norm,
            partial,
            per_sample,
            plan.chunk_len,
            float(eps),
            float(step_size),
            float(lo),
            float(hi),
            Q=q,
            WRITE_SIGN=return_sign_g,
            ROUND_SCALARS=x.device.type == "cpu",
            SPLIT=split,
            BLOCK=plan.block,
            num_warps=plan.num_warps,
        )
    if split:
        g_norm = fold_partial_norms(partial, q, x.dtype)
    return x_new, g_norm, sign_g

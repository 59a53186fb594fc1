"""Triton kernel of ``lfr_ext::grad_norm_triton``: per-sample ``||g_b||_q``, g (B, ...) -> (B,).

``q`` is 1, 2 or inf (code -1); the accumulation is fp32 for fp32/bf16/fp16 inputs. Autograd
is registered in :mod:`lfr_ext.ops` (the same formula as the C++ op's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .aot import STORAGE, AotMatrix
from .common import accumulate_norm, finish_norm, reduce_norm, round_to_storage
from .launch import INTERPRETED, SUPPORTED_DTYPES, check_dtype_and_q, device_guard, fold_partial_norms, plan_launch


@triton.jit
def _grad_norm_fwd_kernel(
    G,  # (B, per_sample) dense
    OUT,  # (B,) norms in G's dtype, written when not SPLIT
    PARTIAL,  # (B, C) fp32 partial norms, written when SPLIT
    per_sample,
    chunk_len,
    Q: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (b, c): ``acc = fold_{i in chunk c} term(g[b, i])`` with term |g| (Q=1), g^2 (Q=2)
    or max |g| (Q=Q_INF); then ``OUT[b] = acc`` (sqrt for Q=2) or ``PARTIAL[b, c] = acc``."""
    sample = tl.program_id(0).to(tl.int64)  # int64: B * per_sample may exceed 2^31
    chunk = tl.program_id(1).to(tl.int64)
    start = chunk * chunk_len
    stop = tl.minimum(start + chunk_len, per_sample)
    row = G + sample * per_sample
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(start, stop, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        g = tl.load(row + idx, mask=idx < stop, other=0.0)
        acc = accumulate_norm(acc, g, Q)
    total = reduce_norm(acc, Q)
    if SPLIT:
        tl.store(PARTIAL + sample * tl.num_programs(1) + chunk, total)
    else:
        tl.store(OUT + sample, round_to_storage(finish_norm(total, Q), OUT.dtype.element_ty))


# Compiled ahead of time (kernels/aot.py): every dtype and q, SPLIT both ways, at BLOCK 1024
# (4 warps; ascent_step's matrix covers the 8-warp plans).
AOT = (
    AotMatrix(
        _grad_norm_fwd_kernel,
        dtypes=SUPPORTED_DTYPES,
        arg_types=dict(G=STORAGE, OUT=STORAGE, PARTIAL="*fp32", per_sample="i64", chunk_len="i64"),
        flags=(dict(SPLIT=False), dict(SPLIT=True)),
        block=1024,
    ),
)


def check_grad_norm_args(g: torch.Tensor, q: int) -> None:
    if g.dim() < 1:
        raise ValueError("grad_norm: g must have a batch dimension, got a 0-dim tensor")
    check_dtype_and_q("grad_norm", g.dtype, q)


def grad_norm_triton(g: torch.Tensor, q: int) -> torch.Tensor:
    """The op ``lfr_ext::grad_norm_triton``: (B,) norms in g's dtype; q is 1, 2 or -1 (inf).
    The launch is written literally in this body (see :func:`.ascent_step.ascent_step_triton`)."""
    check_grad_norm_args(g, q)
    g = g.contiguous()
    batch = g.shape[0]
    per_sample = g.numel() // batch if batch else 0
    out = g.new_empty(batch)
    if batch == 0:
        return out
    plan = plan_launch(batch, per_sample, g.device)
    split = plan.chunks > 1
    partial = g.new_empty((batch, plan.chunks), dtype=torch.float32) if split else g.new_empty(1, dtype=torch.float32)
    kernel = _grad_norm_fwd_kernel if INTERPRETED else wrap_triton(_grad_norm_fwd_kernel)
    with device_guard(g.device):
        kernel[(batch, plan.chunks)](
            g, out, partial, per_sample, plan.chunk_len, Q=q, SPLIT=split, BLOCK=plan.block, num_warps=plan.num_warps
        )
    return fold_partial_norms(partial, q, g.dtype) if split else out

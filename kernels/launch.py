"""Host-side launch plan shared by the Triton ops: block size, warps, and blocks per sample.

Program (b, c) of a grid (B, C) owns chunk c of sample b. When the batch alone fills the GPU
(B >= number of SMs) C = 1 and each program reduces its own sample: one launch. With fewer,
larger samples, C programs share a sample and write fp32 partial norms to a (B, C) buffer,
which a torch reduction folds in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass

import torch
import triton

from .._op_specs import Q_CODES, Q_INF

MAX_BLOCK = 2048  # elements per program per loop iteration
# The storage dtypes of every Triton kernel (kernels/common.py rounds to each of them as PyTorch does).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# triton.jit reads the variable when the kernels are defined, i.e. when this package is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FORCED_CHUNKS: contextvars.ContextVar[int | None] = contextvars.ContextVar("lfr_ext_forced_chunks", default=None)


@dataclass(frozen=True)
class LaunchPlan:
    block: int  # elements per loop iteration, a power of two
    num_warps: int
    chunks: int  # programs per sample (grid axis 1)
    chunk_len: int  # elements per chunk, a multiple of block unless chunks == 1


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":  # a cached device property: no synchronisation
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # CPU tensors run through the interpreter: never split (tests force it with `chunks`)


@contextlib.contextmanager
def forced_chunks(chunks: int):
    """Inside the block, every launch splits each sample over ``chunks`` programs (tests of the
    split path on inputs too small to split by themselves)."""
    token = _FORCED_CHUNKS.set(chunks)
    try:
        yield
    finally:
        _FORCED_CHUNKS.reset(token)


def device_guard(device: torch.device):
    """Make the tensors' GPU current for a launch: Triton launches on the current CUDA device,
    not on the device of its arguments (tensors on cuda:1 would otherwise be read from cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def plan_launch(batch: int, per_sample: int, device: torch.device, chunks: int | None = None) -> LaunchPlan:
    """Launch plan for ``batch`` samples of ``per_sample`` elements; ``chunks`` (or an enclosing
    :func:`forced_chunks`) forces the split."""
    chunks = _FORCED_CHUNKS.get() if chunks is None else chunks
    block = min(MAX_BLOCK, max(128, triton.next_power_of_2(max(per_sample, 1))))
    if chunks is None:
        sms = _multiprocessors(device)
        chunks = 1
        if batch < sms and per_sample > 4 * block:
            chunks = min(triton.cdiv(2 * sms, batch), triton.cdiv(per_sample, 4 * block))
    chunks = max(1, min(chunks, 65535, triton.cdiv(max(per_sample, 1), block)))
    chunk_len = per_sample if chunks == 1 else triton.cdiv(triton.cdiv(per_sample, chunks), block) * block
    chunks = 1 if chunks == 1 else triton.cdiv(per_sample, chunk_len)
    return LaunchPlan(block=block, num_warps=num_warps_for(block), chunks=chunks, chunk_len=chunk_len)


def num_warps_for(block: int) -> int:
    """Warps per program for a ``block``-element loop: 4 up to 1024 elements, 8 above."""
    return 4 if block <= 1024 else 8


def check_dtype_and_q(op: str, dtype: torch.dtype, q: int) -> None:
    """The launchers' refusal of a dtype the kernels lack or of an unknown q code."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: the Triton kernel takes {SUPPORTED_DTYPES}, got {dtype}")
    if q not in Q_CODES:
        raise ValueError(f"{op}: q must be 1, 2 or {Q_INF} (inf), got {q}")


def fold_partial_norms(partial: torch.Tensor, q_code: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, C) fp32 partial norms -> (B,) norms in ``dtype`` (sum, sqrt of sum, or NaN-keeping max)."""
    if q_code == Q_INF:
        return partial.amax(dim=1).to(dtype)
    total = partial.sum(dim=1)
    return (total.sqrt() if q_code == 2 else total).to(dtype)
